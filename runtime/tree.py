"""One view of the whole tree: supervisord's processes and, inside each, its supervisors.

supervisord knows the OS processes; only each process knows its actors. So
every process runs a :class:`TreeReporter` (a child of its root supervisor,
:class:`TreeReporterActor`) that writes its supervision
snapshot to Redis (one hash per process, ``{namespace}:tree:process:{name}:{pid}``,
refreshed every ``tree_publish_interval_s`` and expiring after ``tree_ttl_s``
so a dead process disappears by itself), and :func:`tree_snapshot` merges
those hashes with supervisord's XML-RPC ``getAllProcessInfo`` by pid. Redis
is used (not local files) so the view also works with processes on several
hosts.

Supervision events go to the Redis Stream ``{namespace}:events:supervision``
(and, for give-ups and escalations, also ``{namespace}:events:alerts``) in
the outbox relay's field layout: ``id``, ``type``, ``payload`` (JSON),
``correlation_id``, ``at``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import uuid
import xmlrpc.client
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pykka
import redis

from runtime.actor import SupervisedActor
from runtime.settings import Settings
from runtime.supervision import ChildSpec, EventHook, Restart, SupervisionEvent, Supervisor

log = logging.getLogger(__name__)

# Streams are capped (approximately) so an event storm cannot fill Redis.
STREAM_MAXLEN = 10_000
# Event kinds an on-call person must hear about, not just see on the dashboard.
ALERT_KINDS = frozenset({"give_up", "escalation"})
SUPERVISORD_SOCKET = "supervisor.sock"  # under var_dir, as in supervisord.conf


def stream_key(namespace: str, channel: str) -> str:
    """The Redis Stream of one event channel (the outbox relay's naming)."""
    return f"{namespace}:events:{channel}"


def process_key(namespace: str, process: str, pid: int) -> str:
    """The hash one process publishes its supervision snapshot to."""
    return f"{namespace}:tree:process:{process}:{pid}"


def event_fields(event_type: str, payload: dict[str, Any]) -> dict[str, str]:
    """A stream entry in the outbox relay's layout."""
    return {
        "id": uuid.uuid4().hex,
        "type": event_type,
        "payload": json.dumps(payload, default=str),
        "correlation_id": "",
        "at": datetime.now(UTC).isoformat(),
    }


def redis_event_publisher(client: redis.Redis, namespace: str,
                          process: str | None = None) -> EventHook:
    """An ``on_event`` hook that XADDs supervision events (and alerts) to Redis.

    Runs on the supervisor's thread; a Redis failure is logged and does not
    disturb supervision (the log line and the metric remain).
    """
    origin = {"process": process or "", "pid": os.getpid(), "host": socket.gethostname()}

    def publish(event: SupervisionEvent) -> None:
        fields = event_fields(f"supervision.{event.kind}", {**event.as_dict(), **origin})
        try:
            client.xadd(stream_key(namespace, "supervision"), fields,  # type: ignore[arg-type]
                        maxlen=STREAM_MAXLEN, approximate=True)
            if event.kind in ALERT_KINDS:
                client.xadd(stream_key(namespace, "alerts"), fields,  # type: ignore[arg-type]
                            maxlen=STREAM_MAXLEN, approximate=True)
        except redis.RedisError as exc:
            log.error("could not publish supervision event %s: %s", event.kind, exc)

    return publish


# How soon a reporter publishes again while one of its roots is still starting.
STARTING_REPUBLISH_S = 0.1


class TreeReporter:
    """Publishes this process's supervision trees to Redis every few seconds.

    In a runtime process it runs as a child of the root it reports
    (:class:`TreeReporterActor`, added by :func:`runtime.root.attach_process_supervision`),
    so a reporter that dies is restarted like any actor, with a log line, a
    metric and an event. :meth:`start`/:meth:`stop` run it on a thread of its
    own instead, for a caller without a root of its own to put it under.
    """

    def __init__(self, client: redis.Redis, namespace: str, process: str,
                 roots: Sequence[Supervisor], interval_s: float, ttl_s: int,
                 on_tick: Callable[[], None] | None = None) -> None:
        self._client = client
        self._on_tick = on_tick
        self._key = process_key(namespace, process, os.getpid())
        self._process = process
        self._roots = list(roots)
        self.interval_s = interval_s
        self._ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings, process: str,
                      roots: Sequence[Supervisor]) -> TreeReporter:
        """A reporter on its own Redis client for ``settings``."""
        redis_url, _ = settings.require_urls()
        client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
        return cls(client, settings.namespace, process, roots,
                   settings.tree_publish_interval_s, settings.tree_ttl_s)

    def publish_once(self) -> None:
        """Write the snapshot now (also called by tests instead of waiting)."""
        mapping: dict[str | bytes, str] = {
            "process": self._process, "pid": str(os.getpid()), "host": socket.gethostname(),
            "at": datetime.now(UTC).isoformat(),
            "supervisors": json.dumps([root.describe() for root in self._roots], default=str),
        }
        pipe = self._client.pipeline()
        pipe.hset(self._key, mapping=mapping)  # type: ignore[arg-type]
        pipe.expire(self._key, self._ttl_s)
        pipe.execute()

    def next_tick_s(self) -> float:
        """Seconds until the next publication: the interval, or soon while a root still starts.

        The reporter is its root's last child, so its first snapshot is taken
        before the root itself is ``running``; publishing again shortly lets the
        view show the finished start at once instead of an interval later.
        """
        if any(root.state == "starting" for root in self._roots):
            return min(self.interval_s, STARTING_REPUBLISH_S)
        return self.interval_s

    def tick(self) -> None:
        """One round: publish (a Redis outage is logged: it passes), then ``on_tick``."""
        try:
            self.publish_once()
        except redis.RedisError as exc:
            log.warning("could not publish the supervision tree: %s", exc)
        if self._on_tick is not None:
            self._on_tick()

    def remove(self) -> None:
        """Remove this process's entry from the view (a clean stop)."""
        try:
            self._client.delete(self._key)
        except redis.RedisError as exc:
            log.warning("could not remove the supervision tree entry: %s", exc)

    def start(self) -> TreeReporter:
        """Publish now and then every interval until :meth:`stop`, on a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="tree-reporter", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.tick()
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Stop publishing (the thread, if started) and remove this process's entry."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5)
        self.remove()


# The tree reporter's id among its root's children.
TREE_REPORTER_CHILD = "tree-reporter"


@dataclass(frozen=True)
class _Tick:
    """Time to publish again (the reporter actor's own timer sends it)."""


class TreeReporterActor(SupervisedActor):
    """A :class:`TreeReporter` as a supervised child: one tick per interval, on its thread.

    ``on_start`` sends the first tick; each tick publishes (a Redis outage is
    logged, not a crash) and arms a timer for the next. Anything else escaping
    a tick (a bug) crashes the actor and its supervisor restarts it, which
    starts the ticks again. ``on_stop`` removes the process's entry. Hooks run
    on the actor's thread; the timer only sends the next tick.
    """

    def __init__(self, reporter: TreeReporter) -> None:
        super().__init__()
        self._reporter = reporter
        self._timer: threading.Timer | None = None

    def on_start(self) -> None:
        """Publish at once: the first tick."""
        self.actor_ref.tell(_Tick())

    def on_receive(self, message: Any) -> Any:
        """A tick publishes and arms the next one."""
        if not isinstance(message, _Tick):
            raise TypeError(f"the tree reporter takes no {message!r}")
        self._reporter.tick()
        self._timer = threading.Timer(self._reporter.next_tick_s(), self._next_tick)
        self._timer.daemon = True
        self._timer.start()
        return None

    def _next_tick(self) -> None:
        """The timer's thread: ask for the next tick, unless the actor is gone meanwhile."""
        try:
            self.actor_ref.tell(_Tick())
        except pykka.ActorDeadError:
            pass  # stopped or crashed: a restarted reporter arms its own ticks

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def on_stop(self) -> None:
        """A requested stop: no more ticks, and the process leaves the view."""
        self._disarm()
        self._reporter.remove()

    def on_failure(self, *_exc_info: Any) -> None:
        """After a crash: no more ticks from this incarnation."""
        self._disarm()


def tree_reporter_child(reporter: TreeReporter) -> ChildSpec:
    """The child spec that puts ``reporter`` under a root (permanent: it always comes back)."""
    return ChildSpec(TREE_REPORTER_CHILD, lambda: TreeReporterActor.start(reporter),
                     Restart.PERMANENT)


def supervisord_proxy(socket_path: Path) -> Any:
    """An XML-RPC proxy to supervisord over its unix socket."""
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{socket_path}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def supervisord_processes(socket_path: Path) -> dict[str, Any]:
    """supervisord's own state and every program's process info, or the error."""
    if not socket_path.exists():
        return {"reachable": False, "error": f"no supervisord socket at {socket_path}",
                "processes": []}
    try:
        proxy = supervisord_proxy(socket_path)
        state = proxy.supervisor.getState()
        infos = proxy.supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error) as exc:
        return {"reachable": False, "error": f"supervisord did not answer: {exc}",
                "processes": []}
    processes = [{
        "name": f"{p['group']}:{p['name']}" if p["group"] != p["name"] else p["name"],
        "group": p["group"], "state": p["statename"], "pid": p["pid"] or None,
        "uptime_s": (p["now"] - p["start"]) if p["statename"] == "RUNNING" else 0,
        "exitstatus": p["exitstatus"], "description": p["description"],
    } for p in infos]
    return {"reachable": True, "state": state["statename"], "processes": processes}


def published_processes(client: redis.Redis, namespace: str) -> list[dict[str, Any]]:
    """Every live process's published supervision snapshot."""
    out = []
    for key in client.scan_iter(match=f"{namespace}:tree:process:*", count=200):
        raw = client.hgetall(key)
        if not raw:
            continue
        entry = {_text(k): _text(v) for k, v in raw.items()}
        out.append({
            "process": entry.get("process"), "pid": int(entry.get("pid", "0")),
            "host": entry.get("host"), "at": entry.get("at"),
            "supervisors": json.loads(entry.get("supervisors") or "[]"),
        })
    return sorted(out, key=lambda e: (str(e["process"]), e["pid"]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def tree_snapshot(settings: Settings) -> dict[str, Any]:
    """The merged view: supervisord programs, each with its process's supervisors.

    Blocking (XML-RPC and Redis calls); from the event loop run it in a
    thread (``await asyncio.to_thread(tree_snapshot, settings)``).
    """
    sd = supervisord_processes(settings.var_dir / SUPERVISORD_SOCKET)
    published: list[dict[str, Any]] = []
    redis_error = None
    if settings.redis_url:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0)
        try:
            published = published_processes(client, settings.namespace)
        except redis.RedisError as exc:
            redis_error = str(exc)
        finally:
            client.close()
    host = socket.gethostname()
    by_pid = {(p["host"], p["pid"]): p for p in published}
    for proc in sd["processes"]:
        match = by_pid.pop((host, proc["pid"]), None)
        proc["supervisors"] = match["supervisors"] if match else []
    return {
        "at": datetime.now(UTC).isoformat(),
        "supervisord": {k: v for k, v in sd.items() if k != "processes"},
        "processes": sd["processes"],
        # Processes that publish but are not supervisord's (other hosts, dev runs).
        "other_processes": list(by_pid.values()),
        "redis_error": redis_error,
    }


def render_tree(snapshot: dict[str, Any]) -> str:
    """The snapshot as indented text for ``shopflow tree``."""
    lines = []
    sd = snapshot["supervisord"]
    lines.append(f"supervisord: {sd.get('state') or sd.get('error')}")
    for proc in snapshot["processes"]:
        lines.append(f"├── {proc['name']:<24} {proc['state']:<9} {_process_status(proc)}")
        lines.extend(_render_supervisors(proc.get("supervisors", []), "│   "))
    for proc in snapshot["other_processes"]:
        lines.append(f"(outside supervisord) {proc['process']} pid {proc['pid']} on {proc['host']}")
        lines.extend(_render_supervisors(proc["supervisors"], "    "))
    if snapshot.get("redis_error"):
        lines.append(f"(actors unknown: Redis error {snapshot['redis_error']})")
    return "\n".join(lines)


def _process_status(proc: dict[str, Any]) -> str:
    """The pid and supervisord's description of a program, the pid said once.

    supervisord's description of a running program already reads "pid N,
    uptime H:MM:SS"; in other states it says why or since when (``Exited too
    quickly``, ``Not started``, a stop time), and a stopping program has a
    pid but an empty description, so the pid is added only where it is missing.
    """
    description = str(proc.get("description") or "")
    pid = proc.get("pid")
    if pid and description.startswith(f"pid {pid},"):
        return description
    return "  ".join(part for part in (f"pid {pid or '-'}", description) if part)


def _render_supervisors(supervisors: list[dict[str, Any]], indent: str) -> list[str]:
    lines = []
    for sup in supervisors:
        lines.append(f"{indent}└── {sup['name']} [{sup['strategy']}, {sup['state']}]")
        lines.extend(_render_children(sup["children"], indent + "    "))
    return lines


def _render_children(children: list[dict[str, Any]], indent: str) -> list[str]:
    lines = []
    for child in children:
        depth = ("" if child["mailbox_depth"] is None
                 else f" mailbox {child['mailbox_depth']}/{child['mailbox_size'] or '∞'}")
        lines.append(f"{indent}├── {child['id']} {child['state']} restarts {child['restarts']}"
                     f"{depth}")
        lines.extend(_render_children(child["children"], indent + "│   "))
    return lines


def view_tree(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The snapshot as one tree of ``{name, kind, alive, restarts, state, children}`` nodes.

    The shape the web's supervision view expects: supervisord → processes →
    supervisors → actors (and nested supervisors), each node with its own
    details (pid, strategy, mailbox depth) beside the common keys.
    """
    sd = snapshot["supervisord"]
    processes = [_process_node(p["name"], p["state"] == "RUNNING", p["state"], p["pid"],
                               p.get("supervisors", []))
                 for p in snapshot["processes"]]
    processes += [_process_node(f"{p['process']}@{p['host']}", True, "RUNNING", p["pid"],
                                p["supervisors"])
                  for p in snapshot["other_processes"]]
    return {"name": "supervisord", "kind": "supervisord", "alive": bool(sd.get("reachable")),
            "restarts": 0, "state": sd.get("state") or sd.get("error"), "at": snapshot["at"],
            "children": processes}


def _process_node(name: str, alive: bool, state: str, pid: int | None,
                  supervisors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "kind": "process", "alive": alive, "restarts": 0, "state": state,
            "pid": pid, "children": [_supervisor_node(s) for s in supervisors]}


def _supervisor_node(sup: dict[str, Any]) -> dict[str, Any]:
    children = [_child_node(c) for c in sup["children"]]
    return {"name": sup["name"], "kind": "supervisor", "alive": sup["state"] == "running",
            "restarts": sum(c["restarts"] for c in children), "state": sup["state"],
            "strategy": sup["strategy"], "children": children}


def _child_node(child: dict[str, Any]) -> dict[str, Any]:
    return {**child, "name": child["id"], "children": [_child_node(c) for c in child["children"]]}


class SupervisionTreeView:
    """The web's supervision seam: ``await view.tree()`` (blocking work in a thread)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def tree(self) -> dict[str, Any]:
        """supervisord's processes and each one's supervisors and actors, as one tree."""
        return view_tree(await asyncio.to_thread(tree_snapshot, self._settings))
