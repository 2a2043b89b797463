"""The api process's root supervisor: every background concern of an api process is its child.

DESIGN.md section 2: ``api ── root supervisor ─ notifier actor, event relay
actor``. The concerns declare their children while the app is set up
(:func:`add_child`: the notifier in :func:`web.realtime.setup_realtime`,
the outbox relay in :func:`web.app.create_app`); each child is an async
actor (:class:`runtime.actor.TaskActor`) on aiohttp's own loop, which the
process adopts as its :class:`~runtime.loop.LoopBridge`.

Lifetime: the root starts in ``on_startup``, which aiohttp runs after every
``cleanup_ctx`` has opened its resources (pool, Redis, the notifier's
client), and stops in ``on_shutdown``, before those are closed. The root is
wired like a worker's (:func:`runtime.root.attach_process_supervision`):
every restart is a log line, an event in Redis and, with
:func:`use_shared_metrics`, a metric; the tree is published for
``shopflow tree`` and ``GET /api/v1/supervision``. ``shopflow web`` adds
:func:`runtime.root.exit_process_on_escalate` (:func:`exit_on_escalation`),
so a root that gives up ends the process with exit code 70 and supervisord
restarts it; an app built for a test gets a hook of its own instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from runtime.loop import LoopBridge
from runtime.metrics import get_metrics
from runtime.root import (
    ProcessSupervision,
    SharedSupervisionMetrics,
    attach_process_supervision,
    exit_process_on_escalate,
)
from runtime.settings import Settings
from runtime.supervision import ChildSpec, EscalationHook, Supervisor, supervisor_options

log = logging.getLogger(__name__)

# The api's names in the supervision tree (``shopflow tree``).
PROCESS_NAME = "api"
ROOT_NAME = f"{PROCESS_NAME}-root"

# Builds one child once the app's resources are open (on the loop, at startup).
ChildFactory = Callable[[web.Application, LoopBridge], ChildSpec]


@dataclass
class ApiSupervision:
    """What the app's root supervisor is made of; filled at setup, run at startup."""

    settings: Settings
    factories: list[ChildFactory] = field(default_factory=list)
    escalation_hooks: list[EscalationHook] = field(default_factory=list)
    shared_metrics: bool = False
    root: Supervisor | None = None
    reporting: ProcessSupervision | None = None


SUPERVISION_KEY = web.AppKey("api_supervision", ApiSupervision)


def api_supervision(app: web.Application, settings: Settings) -> ApiSupervision:
    """The app's supervision plan; the first call hooks the root to startup and shutdown."""
    plan = app.get(SUPERVISION_KEY)
    if plan is None:
        plan = ApiSupervision(settings)
        app[SUPERVISION_KEY] = plan
        app.on_startup.append(_start_root)
        app.on_shutdown.append(_stop_root)
    return plan


def add_child(app: web.Application, settings: Settings, factory: ChildFactory) -> None:
    """Declare a child of the api's root supervisor (children start in declaration order)."""
    api_supervision(app, settings).factories.append(factory)


def use_shared_metrics(app: web.Application, settings: Settings) -> None:
    """Count restarts and escalations on the process tree's shared metrics (a real api)."""
    api_supervision(app, settings).shared_metrics = True


def exit_on_escalation(app: web.Application, settings: Settings) -> None:
    """End the process with exit code 70 when the root gives up (``shopflow web``)."""
    api_supervision(app, settings).escalation_hooks.append(exit_process_on_escalate())


def root_of(app: web.Application) -> Supervisor:
    """The running root supervisor of ``app`` (after startup)."""
    plan = app[SUPERVISION_KEY]
    if plan.root is None:
        raise RuntimeError("the api's root supervisor is not running")
    return plan.root


async def _start_root(app: web.Application) -> None:
    """on_startup, on the loop: build the children, wire the reporting, start the tree."""
    plan = app[SUPERVISION_KEY]
    settings = plan.settings
    bridge = LoopBridge.adopt(f"{PROCESS_NAME}-loop")
    root = Supervisor(ROOT_NAME, [factory(app, bridge) for factory in plan.factories],
                      **supervisor_options(settings))
    metrics = SharedSupervisionMetrics(get_metrics(settings)) if plan.shared_metrics else None
    reporting = attach_process_supervision(settings, PROCESS_NAME, root, metrics)
    for hook in plan.escalation_hooks:
        root.add_escalation_hook(hook)
    try:
        # In a thread: the children are async actors whose on_start runs on this loop.
        await asyncio.to_thread(root.start)
    except BaseException:
        await asyncio.to_thread(reporting.stop)
        raise
    plan.root, plan.reporting = root, reporting.start()
    log.info("api root supervisor started", extra={"children": [c.id for c in root.snapshot()]})


async def _stop_root(app: web.Application) -> None:
    """on_shutdown: stop the children in reverse order (in a thread, as they start)."""
    plan = app[SUPERVISION_KEY]
    root, reporting = plan.root, plan.reporting
    plan.root = plan.reporting = None
    if root is not None:
        await asyncio.to_thread(root.stop)
    if reporting is not None:
        await asyncio.to_thread(reporting.stop)
