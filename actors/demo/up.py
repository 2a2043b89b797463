"""``shopflow up``: the one command that brings the whole runtime up on this machine.

Steps: start (or reuse) the embedded Redis and PostgreSQL unless URLs are
set, apply migrations, seed the demo shop, and only then start the process
tree under supervisord with the repository's supervisord.conf (so no process
ever starts on an unmigrated database), wait for /health, pin the embedded
warehouse simulator's stock (it runs inside the tree), replay real CDNOW
orders, print the summary. Then it keeps running until Ctrl-C (or,
with ``--once``, stops everything and exits 0 when every order has an
outcome). What it started, it stops; an embedded server it found running
(reused) is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from actors.demo.catalog import CdnowOrder
from actors.demo.command import (
    add_replay_arguments,
    align_shop_stock,
    pin_simulator_stock,
    replay_orders,
    report_summary,
    seed_demo,
    with_simulator_stock_file,
)
from actors.demo.replay import Summary
from runtime import embedded
from runtime.cli import add_command
from runtime.errors import ServiceError
from runtime.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
SUPERVISORD_CONF = REPO_ROOT / "supervisord.conf"
HEALTH_TIMEOUT_S = 60.0


def _bin(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else (shutil.which(name) or name)


def start_supervisord(settings: Settings) -> subprocess.Popen[bytes]:
    """Run supervisord in the foreground as our child, with the settings in its environment."""
    (settings.var_dir / "log").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings.to_env()}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.Popen([_bin("supervisord"), "-c", str(SUPERVISORD_CONF)], env=env,
                            start_new_session=True)


def wait_healthy(settings: Settings, proc: subprocess.Popen[bytes]) -> None:
    """Wait for GET /health to answer 200, or fail clearly."""
    url = f"http://{settings.http_host}:{settings.http_port}/health"
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"supervisord exited with {proc.returncode}; see {settings.var_dir}/log/")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    print(health_line(json.loads(resp.read())), file=sys.stderr)
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise ServiceError(f"{url} did not answer 200 within {HEALTH_TIMEOUT_S}s; see {settings.var_dir}/log/")


def health_line(health: dict[str, Any]) -> str:
    """What ``up`` says once ``/health`` answers 200: healthy, or up but degraded.

    200 with ``degraded`` means the api serves while something it watches does
    not yet (the scheduler takes its lease a few seconds after the tree starts);
    calling that "healthy" beside a check that is not ok would contradict itself.
    """
    state = "healthy" if health.get("status") == "ok" else f"up, {health.get('status')}"
    return f"runtime {state} ({describe_checks(health.get('checks', {}))})"


def describe_checks(checks: dict[str, dict[str, Any]]) -> str:
    """``/health``'s checks in one line: ``redis ok 0.4 ms, postgres ok 1.2 ms, scheduler ...``."""
    parts = []
    for name, check in checks.items():
        if not check.get("ok"):
            parts.append(f"{name} NOT ok: {check.get('error') or check.get('detail') or check}")
        elif "latency_ms" in check:
            parts.append(f"{name} ok {check['latency_ms']} ms")
        else:
            detail = check.get("detail")
            parts.append(f"{name} ok" + (f" ({detail})" if detail and detail != "ok" else ""))
    return ", ".join(parts)


def stop_supervisord(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM supervisord: it stops every program gracefully, then exits."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _stop_signals_call(handler: Callable[[int, object], None]) -> Iterator[None]:
    """SIGINT and SIGTERM call ``handler`` while inside; the previous handlers after."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_signals_as_interrupt() -> AbstractContextManager[None]:
    """Treat SIGINT and SIGTERM like Ctrl-C while inside, so ``kill PID`` and
    ``kill -INT PID`` stop what ``up`` started instead of leaving supervisord and
    the embedded servers behind. SIGINT needs it too: a shell starts a background
    job with SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    return _stop_signals_call(_interrupt)


def _still_stopping(_signum: int, _frame: object) -> None:
    print("shopflow up: still stopping (the process tree may take up to 2 min to finish its "
          "jobs); waiting", file=sys.stderr)


def stop_signals_deferred() -> AbstractContextManager[None]:
    """While the way out runs, a second Ctrl-C or ``kill`` only says it is under way.

    Raised in the middle of stopping, it would stop the embedded servers under workers
    still finishing their jobs (whose graceful hand-back then fails), or leave
    PostgreSQL running when it lands inside its stop.
    """
    return _stop_signals_call(_still_stopping)


def _cmd_up(args: argparse.Namespace, given: Settings) -> int:
    with stop_signals_as_interrupt():
        return _up(args, given)


def _up(args: argparse.Namespace, given: Settings) -> int:
    # Embedded servers this command started are stopped on the way out; reused ones stay up.
    settings, started = embedded.start_services(given)
    try:
        return _run_tree(args, settings)
    finally:
        with stop_signals_deferred():
            embedded.stop_started(settings, started)
            print(stopped_note(started, settings), file=sys.stderr)


def stopped_note(started: embedded.StartedServices, settings: Settings) -> str:
    """What the way out did with the embedded servers, so nobody wonders whether they run on."""
    stopped = [name for name, was in (("Redis", started.redis), ("PostgreSQL", started.postgres))
               if was]
    kept = [name for name, was in (("Redis", started.redis), ("PostgreSQL", started.postgres))
            if not was]
    parts = []
    if stopped:
        parts.append(f"stopped the embedded {' and '.join(stopped)} this command started "
                     f"(data kept in {settings.var_dir})")
    if kept:
        parts.append(f"{' and '.join(kept)} not started by this command: left as found")
    return "; ".join(parts)


def _run_tree(args: argparse.Namespace, settings: Settings) -> int:
    """Seed, start the tree, replay; stop the tree on the way out (Ctrl-C included)."""
    print(f"REDIS_URL={settings.redis_url}\nDATABASE_URL={settings.database_url}",
          file=sys.stderr)
    # Migrate and seed first: the tree's processes expect the schema and the shop.
    print("migrating and seeding the demo shop (catalogue, customers of the orders to "
          "replay)...", file=sys.stderr)
    try:
        orders = asyncio.run(seed_demo(settings, args.limit, args.data, args.stock_multiplier))
    except KeyboardInterrupt:
        return 130
    print(f"starting the process tree under supervisord ({SUPERVISORD_CONF.name}); logs in "
          f"{settings.var_dir}/log/", file=sys.stderr)
    settings = with_simulator_stock_file(settings, args.stock_multiplier)
    proc = start_supervisord(settings)
    code = 0
    try:
        wait_healthy(settings, proc)
        summary = asyncio.run(_pin_and_replay(settings, orders, args))
        code = report_summary(summary, args.summary_json)
        if not args.once:
            print(f"\nruntime is up: http://{settings.http_host}:{settings.http_port}/health"
                  "  (Ctrl-C, or kill PID, stops it)", file=sys.stderr)
            proc.wait()
    except KeyboardInterrupt:
        code = 130
    finally:
        with stop_signals_deferred():
            stop_supervisord(proc)
    return code


async def _pin_and_replay(settings: Settings, orders: list[CdnowOrder],
                          args: argparse.Namespace) -> Summary:
    """Pin the simulator's stock (it runs in the tree, so only now), then replay."""
    await align_shop_stock(settings, await pin_simulator_stock(settings, args.stock_multiplier))
    return await replay_orders(settings, orders, args.day_s, args.timeout_s)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Plug ``shopflow up`` into the command line."""
    parser = add_command(sub, "up", _cmd_up, "start the whole runtime and replay real orders",
                         "start everything (embedded Redis/PostgreSQL, migrations, demo data, the "
                         "process tree under supervisord) and replay real orders")
    add_replay_arguments(parser)
    parser.add_argument("--once", action="store_true",
                        help="stop everything and exit when the replay is done (0 if every order has an outcome)")
