"""``shopflow simulators``: run the warehouse and carrier simulators until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from aiohttp import web

from ops.simulators.carrier import create_carrier_app
from ops.simulators.faults import Faults
from ops.simulators.warehouse import create_warehouse_app
from runtime.settings import Settings


def _faults(args: argparse.Namespace) -> Faults:
    return Faults(latency_ms=args.latency_ms, error_rate=args.error_rate,
                  hang_rate=args.hang_rate, malformed_rate=args.malformed_rate)


async def _serve(args: argparse.Namespace, settings: Settings) -> None:
    runners = []
    apps = [
        (create_warehouse_app(args.seed, _faults(args), settings.warehouse_token),
         args.warehouse_port or settings.warehouse_sim_port, "warehouse"),
        (create_carrier_app(args.seed, _faults(args), settings.carrier_token),
         args.carrier_port or settings.carrier_sim_port, "carrier"),
    ]
    try:
        for app, port, name in apps:
            runner = web.AppRunner(app, shutdown_timeout=1.0)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, args.host, port).start()
            print(f"{name} simulator on http://{args.host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _cmd_simulators(args: argparse.Namespace, settings: Settings) -> int:
    asyncio.run(_serve(args, settings))
    return 0


def register(subparsers: Any) -> None:
    """Entry point for ``shopflow.commands``: adds ``shopflow simulators``."""
    from runtime.cli import add_command

    parser = add_command(subparsers, "simulators", _cmd_simulators,
                         "run the warehouse and carrier simulators",
                         "run the warehouse and carrier simulators (see docs/externals.md)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--warehouse-port", type=int, default=0,
                        help="default: SHOPFLOW_WAREHOUSE_SIM_PORT")
    parser.add_argument("--carrier-port", type=int, default=0,
                        help="default: SHOPFLOW_CARRIER_SIM_PORT")
    parser.add_argument("--seed", type=int, default=7, help="seed of the simulated stock and faults")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--hang-rate", type=float, default=0.0)
    parser.add_argument("--malformed-rate", type=float, default=0.0)
