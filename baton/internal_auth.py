"""The shared token of the internal API (/internal/*): who sends it, under which header, the check.

With `internal_token` set, pods answer /internal/* only to peers that send it (the router,
a decode pod calling a prefill pod); /health, /ready and /metrics stay open for probes.
"""

from __future__ import annotations

import hmac

HEADER = "X-Baton-Token"


def headers(token: str | None) -> dict[str, str]:
    """Default headers for a peer's HTTP client: the token, when one is set."""
    return {HEADER: token} if token else {}


def valid(token: str, got: str | None) -> bool:
    return got is not None and hmac.compare_digest(got.encode(), token.encode())
