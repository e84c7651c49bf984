"""The process's ucxx set-up: environment, one context bound to the running loop, shutdown.

ucxx keeps one global context per process. Its listener callbacks and request futures belong
to the event loop that was running when the context was created. So every sender and receiver
in a process must run on that one loop, and `acquire()` must be awaited on it before ucxx is
touched.

Settings, and why:
- `UCX_MM_ERROR_HANDLING=y`. Without it UCX's shared-memory transports refuse endpoint error
  handling, and CPU processes on one host talk over TCP loopback (<= 1.3 GB/s here).
  Endpoint error handling stays on: with it off, a dead peer leaves recvs hanging forever.
  Even so, large host-memory messages take sysv's "rendezvous fragmented copy-in copy-out".
  CMA's zero-copy read is not eligible while error handling is on (UCX_PROTO_INFO=y shows
  it), so CPU-to-CPU pushes stay well below memcpy speed. GPU-to-GPU uses CUDA IPC, which is
  eligible.
- `UCX_WARN_UNUSED_ENV_VARS=n`. ucxx sets UCX_MEMTYPE_CACHE, which UCX 1.21 no longer knows,
  so every process would warn.
- Progress mode `thread`, with requests completed through Python futures
  (`UCXPY_ENABLE_PYTHON_FUTURE=1`). ucxx's default completes requests by polling: each
  pending request's `wait()` loops `await asyncio.sleep(0)`. Our connections always keep a
  control recv posted, so an idle pod would burn a whole core (measured: 0.92 s of CPU per
  second with one idle recv) and fight the model thread for the GIL. With futures, a
  notifier thread wakes the loop only when requests complete (0.02 s per idle second).
  Either variable can still be overridden from the environment, e.g. to compare the two
  in a benchmark. In `thread` mode ucxx's own C++ thread progresses the worker, and
  requests reach it through ucxx's delayed-submission queue: once a send is submitted its
  bytes move without the GIL, however busy the model thread keeps it. What still needs the
  loop (and so the GIL) is submitting a request and learning that it completed; the sender
  keeps several sends submitted at once so that this per-message cost overlaps the
  transfers (sender.py).
- No fork after ucxx's first use: a forked child gets UCXTimedOutError. Start pods with
  spawn. `acquire()` refuses in a forked child, with that message.

The last `release()` resets ucxx, so a process can start it again later on another loop.
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)

ENV_DEFAULTS = {
    "UCX_MM_ERROR_HANDLING": "y",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "UCXPY_PROGRESS_MODE": "thread",
    "UCXPY_ENABLE_PYTHON_FUTURE": "1",
}

_loop: asyncio.AbstractEventLoop | None = None
_users = 0
_forked_from: int | None = None
_fork_hook_installed = False


def configure_environment() -> None:
    """Set the UCX variables this package relies on, unless the environment already has them.

    They are read when ucxx creates its context, so this must run before that. `acquire()`
    calls it. Call it yourself earlier if something else in the process may touch ucxx first.
    """
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


# At import, too: whoever imports the sender or receiver gets these before ucxx reads them,
# even if they import ucxx themselves before start().
configure_environment()


def _mark_forked() -> None:
    global _forked_from
    if _loop is not None:  # forked while ucxx was up
        _forked_from = os.getppid()


async def acquire() -> None:
    """Initialise ucxx on the running loop (first caller) and count one user."""
    global _loop, _users, _fork_hook_installed
    if _forked_from is not None:
        raise RuntimeError(
            f"ucxx was initialised in process {_forked_from} and this process is its fork: "
            "UCX does not survive fork, start the process with spawn"
        )
    loop = asyncio.get_running_loop()
    if _loop is not None and _loop is not loop:
        raise RuntimeError("ucxx in this process is bound to another event loop")
    configure_environment()
    import ucxx

    if _loop is None:
        try:
            ucxx.init()  # reads the UCXPY_* variables set above
        except RuntimeError:
            # Someone touched ucxx first; it works, with whatever settings were current then.
            log.warning("ucxx was initialised before baton.kvtransfer; its settings may differ")
        _loop = loop
        if not _fork_hook_installed:
            os.register_at_fork(after_in_child=_mark_forked)
            _fork_hook_installed = True
    _users += 1


def release() -> None:
    """Drop one user. The last one shuts ucxx down (`ucxx.reset()`): its notifier and
    progress threads stop, and a later `acquire()` may start it again on another loop.

    The notifier thread is not a daemon: left running, it keeps the process from exiting.
    Stopping it takes up to a second, the period it waits for notifications.
    """
    global _users, _loop
    if _users <= 0:
        return
    _users -= 1
    if _users == 0:
        import ucxx

        _loop = None
        try:
            ucxx.reset()
        except Exception as e:  # noqa: BLE001 - an endpoint someone still holds; harmless
            log.warning("ucxx.reset() left objects alive: %s", str(e).splitlines()[0])


def is_ucx_error(exc: BaseException) -> bool:
    from ucxx.exceptions import UCXError

    return isinstance(exc, UCXError)
