#!/usr/bin/env python3
"""The image's health check (`baton-healthcheck [URL]`): exit 0 when a Baton service answers 200.

Stdlib only and no `baton` import, so a check costs milliseconds, not an interpreter full of
torch. With a URL it checks that URL (what docker-compose.yml does, with the port spelled out).
Without one (the Dockerfile's HEALTHCHECK, for a plain `docker run`) it checks /ready on
BATON_PORT, else on each service's default port: one image runs every role, and only one
service listens in a container. tests/deploy checks these defaults against the settings classes.
"""

from __future__ import annotations

import os
import sys
import urllib.request

DEFAULT_PORTS = {"router": 8000, "decode": 8100, "prefill": 8200}


def ok(url: str, timeout_s: float = 3.0) -> bool:
    # Containers may carry HTTP(S)_PROXY for model downloads; a proxy must never see this.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


def urls(argv: list[str]) -> list[str]:
    if argv:
        return argv[:1]
    port = os.environ.get("BATON_PORT")
    ports = [int(port)] if port else sorted(DEFAULT_PORTS.values())
    return [f"http://127.0.0.1:{p}/ready" for p in ports]


def main(argv: list[str]) -> int:
    return 0 if any(ok(u) for u in urls(argv)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
