"""`baton router --workers N`: N router processes on one port (SO_REUSEPORT), supervised.

Each worker is a whole router (its own event loop, pod table and connections to pods); the
kernel spreads new client connections over them. What they must agree on, the pods' load and
the KV index, they already share through Redis, as separate routers do. This process only
starts them, passes SIGTERM (drain) and SIGINT on, and ends when they have: if one exits, the
others are stopped and its status is ours.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from baton.router.settings import RouterSettings

log = logging.getLogger("baton.router.workers")
_POLL_S = 0.1


def run_workers(argv: list[str], settings: RouterSettings) -> int:
    if not settings.port:
        raise ValueError("--workers > 1 needs a fixed --port (with 0, each worker would get its own)")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the later flags win: each worker is one router process, bound with SO_REUSEPORT
    cmd = [sys.executable, "-m", "baton.cli", "router", *argv, "--workers", "1", "--reuse-port"]
    # their own sessions: a Ctrl-C reaches this process only, which passes it on once
    procs = [subprocess.Popen(cmd, start_new_session=True) for _ in range(settings.workers)]
    log.info("router workers %s on port %d", [p.pid for p in procs], settings.port)
    received: list[int] = []

    def forward(sig, _frame) -> None:
        received.append(sig)
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(p.poll() is None for p in procs):
        time.sleep(_POLL_S)
    first = next(p for p in procs if p.poll() is not None)
    if not received:
        log.error("router worker %d exited with %d; stopping the others", first.pid, first.returncode)
        forward(signal.SIGTERM, None)
    deadline = time.monotonic() + settings.drain_timeout_s + 15
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c), 0) if received else (first.returncode or 1)
