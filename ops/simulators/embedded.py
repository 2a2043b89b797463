"""The simulators inside a runtime process: the default embedded run on a fresh machine.

Without ``WAREHOUSE_URL`` / ``CARRIER_URL`` the processes that need those
services (stock sync: the warehouse; the flow worker: the carrier and the
warehouse's packing API) serve the simulator themselves on its fixed port
(``SHOPFLOW_WAREHOUSE_SIM_PORT``, ``SHOPFLOW_CARRIER_SIM_PORT``), or use the
one already listening there: another runtime process, or ``shopflow
simulators``. Whoever starts one stops it.
"""

from __future__ import annotations

import logging

from aiohttp import web

from ops.simulators.warehouse import create_warehouse_app, load_stock_file
from runtime.settings import Settings

log = logging.getLogger(__name__)

# The seed of every simulator the runtime starts itself, so whichever process
# serves the warehouse, its stock is the same.
SIMULATOR_SEED = 7
# Hung requests are released at once when the owning process stops.
SHUTDOWN_TIMEOUT_S = 1.0


def embedded_warehouse_app(settings: Settings) -> web.Application:
    """The warehouse simulator a runtime process serves: the shared seed, and the starting
    stock of ``SHOPFLOW_WAREHOUSE_SIM_STOCK_FILE`` if set (the same in every process, so it
    does not matter which one serves it)."""
    stock = (load_stock_file(settings.warehouse_sim_stock_file)
             if settings.warehouse_sim_stock_file else None)
    return create_warehouse_app(seed=SIMULATOR_SEED, stock=stock)


async def serve_simulator(app: web.Application, port: int,
                          host: str = "127.0.0.1") -> web.AppRunner:
    """Serve ``app`` on ``host:port``; OSError (after cleaning up) if the port is taken."""
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


async def start_or_reuse(name: str, app: web.Application, port: int,
                         host: str = "127.0.0.1") -> web.AppRunner | None:
    """Start the ``name`` simulator on ``port``, or reuse the one listening there (None).

    The caller owns a returned runner and must ``cleanup()`` it.
    """
    try:
        runner = await serve_simulator(app, port, host)
    except OSError as exc:
        log.info("%s simulator: port %d is taken (%s); using the one listening there",
                 name, port, exc.strerror or exc)
        return None
    log.info("started the %s simulator at http://%s:%d", name, host, port)
    return runner
