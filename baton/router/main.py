"""Starting the router: `main(argv)` for the CLI (`baton router ...`), `run(settings)` for code."""

from __future__ import annotations

import logging

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
    )


def main(argv: list[str] | None = None) -> None:
    run(RouterSettings.from_argv(argv))


if __name__ == "__main__":
    main()
