"""A progress bar on stderr: tqdm when installed, else one rewritten status line."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = self.errors = 0
        self._bar = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=True)

    def update(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if not ok:
                self._bar.set_postfix(errors=self.errors)
            return
        now = time.monotonic()
        if now - self._last >= 0.5 or self.done == self.total:
            self._last = now
            sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} requests, {self.errors} errors")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
