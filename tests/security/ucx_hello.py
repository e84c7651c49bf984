"""Open UCX connections to a KV receiver as a sender would, one per secret given, and print how
each went: `connected` or `refused: <why>`. Run as a process of its own (ucxx binds to one
event loop per process): python tests/security/ucx_hello.py HOST:PORT SECRET [SECRET ...]
("-" for no secret)."""

from __future__ import annotations

import asyncio
import sys

from baton.kvtransfer import ucx_runtime
from baton.kvtransfer.errors import TransferFailed
from baton.kvtransfer.sender_connections import SenderConnections


async def main(address: str, secrets: list[str]) -> None:
    await ucx_runtime.acquire()
    try:
        for secret in secrets:
            conns = SenderConnections("intruder", 5.0, "" if secret == "-" else secret)
            try:
                await conns.get(address)
                print("connected", flush=True)
            except TransferFailed as e:
                print(f"refused: {e}", flush=True)
            finally:
                await conns.close("done")
    finally:
        ucx_runtime.release()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
