"""Starting the router: `main(argv)` for the CLI (`baton router ...`), `run(settings)` for code."""

from __future__ import annotations

import logging
import sys

from baton.drain import serve
from baton.router.app import create_app
from baton.router.settings import RouterSettings


def run(settings: RouterSettings) -> None:
    """Serve until interrupted (blocks); SIGTERM drains first (baton/drain.py)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    serve(
        app,
        app.state.drain,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
        header_timeout_s=settings.header_timeout_s,
        limit_concurrency=settings.max_connections,
        reuse_port=settings.reuse_port,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = RouterSettings.from_argv(argv)
    if settings.workers > 1:
        from baton.router.workers import run_workers

        return run_workers(argv, settings)
    run(settings)
    return 0


if __name__ == "__main__":
    main()
