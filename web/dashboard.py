"""The operators' dashboard at ``/``: plain HTML, CSS and JavaScript, no build step.

The page asks once for a staff token (kept in the browser's localStorage),
loads its start state from the JSON API and then stays live over ``/ws``.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).resolve().parent / "static"


async def index(request: web.Request) -> web.FileResponse:
    """The dashboard page (no secrets in it: the token stays in the browser)."""
    return web.FileResponse(STATIC_DIR / "index.html",
                            headers={"Cache-Control": "no-cache"})


def setup_dashboard(app: web.Application) -> None:
    """Serve the dashboard at ``/`` and its files under ``/static/``."""
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
