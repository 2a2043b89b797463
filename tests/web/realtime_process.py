"""A stand-alone api process serving only /ws, for tests that need separate OS processes.

    python -m tests.web.realtime_process PORT REDIS_URL NAMESPACE SECRET
"""

from __future__ import annotations

import sys
from dataclasses import replace

from aiohttp import web

from runtime.settings import Settings
from web.realtime import setup_realtime


def main(argv: list[str]) -> None:
    port, redis_url, namespace, secret = argv
    settings = replace(Settings.from_env({}), redis_url=redis_url, database_url="unused",
                       namespace=namespace, token_secret=secret, notifier_block_ms=200)
    app = web.Application()
    setup_realtime(app, settings)
    web.run_app(app, host="127.0.0.1", port=int(port), print=None, access_log=None,
                shutdown_timeout=2)


if __name__ == "__main__":
    main(sys.argv[1:])
