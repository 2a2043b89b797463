"""The aiohttp application: HTTP API, health, and the outbox relay of this api process.

``create_app(settings)`` builds a fresh app; resources (database pool, Redis,
broker) are opened and closed in ``cleanup_ctx``; the outbox relay, the queue
feed and the notifier are actors under the process's root supervisor
(:mod:`web.supervision`). Handlers only check the caller's token, parse, call
the order workflow and translate domain errors to HTTP answers. The orders
endpoints need a token like the rest of ``/api/v1``: staff (a service) for any
order, a customer for their own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg
import pykka
import redis.asyncio as aioredis
from aiohttp import web

from actors.orders import workflow
from runtime import db, embedded
from runtime.actor import MailboxConfig, TaskActor
from runtime.broker import ALL_QUEUES, setup_broker
from runtime.cli import add_command
from runtime.errors import NotFound
from runtime.jobs.broker import JobBroker
from runtime.jobs.feed import QueueFeed
from runtime.jobs.store import JobStore
from runtime.loop import LoopBridge
from runtime.metrics import get_metrics
from runtime.observability import metrics_handler
from runtime.outbox import OutboxRelay, OutboxRow, now_utc
from runtime.scheduling.health import scheduler_health
from runtime.settings import Settings
from runtime.supervision import ChildSpec, Restart
from web.api_extra import POOL_KEY, REDIS_KEY, setup_api
from web.auth import authenticate, ensure_signer
from web.dashboard import setup_dashboard
from web.httpkit import MAX_BODY_BYTES, error_middleware, json_errors, read_json
from web.realtime import setup_realtime
from web.supervision import add_child, exit_on_escalation, use_shared_metrics
from web.wiring import plug_seams

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
REDIS = web.AppKey("redis", aioredis.Redis)
BROKER = web.AppKey("broker", JobBroker)
# The outbox relay's id under the api's root supervisor.
RELAY_CHILD = "outbox-relay"
# The queue feed's id under the api's root supervisor.
FEED_CHILD = "queue-feed"


def _order_id(request: web.Request) -> int:
    raw = request.match_info["order_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"order {raw!r} does not exist")
    return int(raw)


def _acting_for(request: web.Request) -> int | None:
    """The customer a request acts for: ``None`` for staff (services, operators), who act for
    anyone; a customer token's own id otherwise. No valid token is a 401."""
    principal = authenticate(request)
    return None if principal.is_staff else principal.customer_id


async def create_order(request: web.Request) -> web.Response:
    """POST /api/v1/orders: create an order; its stock reservation is queued.

    Staff (the checkout, the demo replay) order for any customer; a customer
    token only for its own ``customer_id`` (403 otherwise).
    """
    for_customer = _acting_for(request)
    order, created = await workflow.place_order(request.app[POOL], await read_json(request),
                                                for_customer)
    return web.json_response(order, status=201 if created else 200)


async def confirm_payment(request: web.Request) -> web.Response:
    """POST /api/v1/orders/{id}/payment: confirm payment of a reserved order (idempotent).

    Staff, or the customer who owns the order; anyone else gets 404.
    """
    for_customer = _acting_for(request)
    order, _ = await workflow.pay_order(request.app[POOL], _order_id(request), for_customer)
    return web.json_response(order)


async def get_order(request: web.Request) -> web.Response:
    """GET /api/v1/orders/{id}: the order, its items and its status history.

    Staff, or the customer who owns the order; anyone else gets 404.
    """
    for_customer = _acting_for(request)
    async with request.app[POOL].acquire() as conn:
        return web.json_response(await workflow.read_order(conn, _order_id(request),
                                                           for_customer))


async def _timed(check: Awaitable[Any]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check, timeout=2.0)
        return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
    except Exception as exc:  # noqa: BLE001 - a health check reports every failure as data
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


async def health(request: web.Request) -> web.Response:
    """GET /health: Redis and PostgreSQL reachable (503 if not), and the scheduler's heartbeat.

    A stale scheduler makes the status ``degraded`` but keeps the answer 200:
    this api process still serves every request, and a 503 would make a load
    balancer (or ``shopflow up``) drop a healthy api because of cron.
    """
    pool = request.app[POOL]
    checks = {
        "redis": await _timed(request.app[REDIS].ping()),
        "postgres": await _timed(pool.fetchval("SELECT 1")),
    }
    servers_ok = all(c["ok"] for c in checks.values())
    if checks["redis"]["ok"]:
        checks["scheduler"] = await _scheduler_check(request.app)
    ok = all(c["ok"] for c in checks.values())
    return web.json_response({"status": "ok" if ok else "degraded", "checks": checks},
                             status=200 if servers_ok else 503)


async def _scheduler_check(app: web.Application) -> dict[str, Any]:
    settings = app[SETTINGS]
    scheduler = await scheduler_health(app[REDIS], settings.namespace, now_utc(),
                                       stale_after_s=settings.cron_heartbeat_ttl_s)
    return scheduler.as_json()


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis_url, database_url = settings.require_urls()
    app[POOL] = await db.create_pool(database_url, min_size=1, max_size=10)
    app[REDIS] = aioredis.Redis.from_url(redis_url)
    app[BROKER] = setup_broker(settings)
    # The extra API and the seams share this process's resources.
    app[POOL_KEY] = app[POOL]
    app[REDIS_KEY] = app[REDIS]
    plug_seams(app, settings, app[POOL], app[REDIS], app[BROKER])
    yield
    app[BROKER].close()
    await app[REDIS].aclose()
    await app[POOL].close()


def relay_child(app: web.Application, bridge: LoopBridge) -> ChildSpec:
    """The outbox relay as a supervised async actor: ``OutboxRelay.run`` is its life.

    Outages of PostgreSQL and Redis are ridden out inside ``run()``; anything
    else escaping it (a bug, a row it cannot handle) crashes the actor and the
    root restarts it with a fresh relay: a log line, a metric and an event,
    never a task that silently stopped. Unpublished rows wait in the outbox.
    """
    settings = app[SETTINGS]
    _, database_url = settings.require_urls()
    metrics = get_metrics(settings)

    def on_published(rows: list[OutboxRow]) -> None:
        for row in rows:
            metrics.outbox_events_published.labels(row.channel).inc()

    def on_round(rows: list[OutboxRow]) -> None:
        # Every unpublished row the round found, held ones included: a queue that stays full
        # shows as a growing lag (ShopflowOutboxLag), not as a gauge frozen at its last value.
        oldest = min(row.created_at for row in rows)
        metrics.outbox_lag.set((now_utc() - oldest).total_seconds())

    def start() -> pykka.ActorRef[Any]:
        relay = OutboxRelay(app[POOL], database_url, app[REDIS], app[BROKER], settings.namespace,
                            settings.outbox_poll_s, on_published=on_published,
                            on_idle=lambda: metrics.outbox_lag.set(0), on_round=on_round)
        # stop=: the relay ends its round and returns, even if a cancel would be swallowed.
        return TaskActor.start(bridge, RELAY_CHILD, relay.run, stop=relay.stop,
                               mailbox=MailboxConfig.from_settings(settings))

    return ChildSpec(RELAY_CHILD, start, Restart.PERMANENT)


def queue_feed_child(app: web.Application, bridge: LoopBridge) -> ChildSpec:
    """The queue feed (live counts on the ``queues`` channel) as a supervised async actor."""
    settings = app[SETTINGS]
    broker = app[BROKER]

    def start() -> pykka.ActorRef[Any]:
        store = JobStore(app[REDIS], broker.keys,
                         sorted(broker.get_declared_queues() | set(ALL_QUEUES)))
        return TaskActor.start(bridge, FEED_CHILD, QueueFeed(store, app[REDIS],
                                                            settings.namespace).run,
                               mailbox=MailboxConfig.from_settings(settings))

    return ChildSpec(FEED_CHILD, start, Restart.PERMANENT)


def create_app(settings: Settings) -> web.Application:
    """A new application for ``settings`` (which must carry both URLs)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    ensure_signer(app, settings)  # every /api/v1 call carries a token (web/auth.py)
    app.cleanup_ctx.append(_resources)
    use_shared_metrics(app, settings)
    add_child(app, settings, relay_child)  # the api's root supervisor, with the notifier
    add_child(app, settings, queue_feed_child)
    app.router.add_post("/api/v1/orders", json_errors(create_order))
    app.router.add_get("/api/v1/orders/{order_id}", json_errors(get_order))
    app.router.add_post("/api/v1/orders/{order_id}/payment", json_errors(confirm_payment))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_handler(settings))
    setup_realtime(app, settings)  # GET /ws and this process's notifier
    setup_api(app, settings)  # the rest of /api/v1 and /api/v1/openapi.json
    setup_dashboard(app)  # GET / and /static/
    return app


def _cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    settings = embedded.ensure_services(settings)
    app = create_app(settings)
    exit_on_escalation(app, settings)  # root gave up: exit 70, supervisord restarts us
    web.run_app(app, host=settings.http_host, port=settings.http_port, reuse_port=True,
                print=None, access_log=None, shutdown_timeout=10)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Plug ``shopflow web`` into the command line."""
    add_command(sub, "web", _cmd_web, "run an api process (HTTP API, /health, outbox relay)",
                "run an api process on the shared port (SO_REUSEPORT): HTTP API, /ws and its "
                "notifier, the dashboard, /metrics, /health and the outbox relay")
