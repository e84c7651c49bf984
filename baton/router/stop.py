"""Stop strings over streamed text: cut before the first match, never emit past it.

Only the end of the text that could still grow into a stop string is held back; everything
before it is safe to send. Pure: text in, (safe text, stopped) out.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything seen so far
        self.sent = 0  # len of the prefix of `text` already released
        self.stopped = False

    def _held(self) -> int:
        """Length of the longest suffix of the unsent text that is a proper prefix of a stop string."""
        tail = self.text[self.sent :]
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, delta: str, final: bool = False) -> str:
        """Add text; returns what may be sent now. After a match, `stopped` is set and the
        returned text ends right before the stop string. `final` releases the held tail."""
        if self.stopped:
            return ""
        self.text += delta
        # A match can start no earlier than `sent`: whatever could begin one was held back.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        else:
            end = len(self.text) if final else len(self.text) - self._held()
        out = self.text[self.sent : end]
        self.sent = end
        return out
