"""Every restart/give-up/escalation is a metric and a Redis event; the tree view merges."""

from __future__ import annotations

import io
import json
import os
import threading
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from runtime.root import attach_process_supervision
from runtime.settings import Settings
from runtime.supervision import ChildSpec, Supervisor, build_supervision_metrics
from runtime.supervisor_events import serve
from runtime.tree import (
    STARTING_REPUBLISH_S,
    TREE_REPORTER_CHILD,
    TreeReporter,
    process_key,
    redis_event_publisher,
    render_tree,
    tree_snapshot,
    view_tree,
)
from tests.support import next_supervision_event, wait_until

from .helpers import Events, Journal, Worker


def entries(client: redis.Redis, key: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in client.xrange(key)]


def test_restarts_and_give_ups_are_metrics_and_redis_events(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    registry = CollectorRegistry()
    metrics = build_supervision_metrics(registry)
    publish = redis_event_publisher(client, settings.namespace, "test-process")
    events, journal = Events(), Journal()

    def both(event: Any) -> None:
        publish(event)
        events(event)

    sup = Supervisor("root", [ChildSpec("a", lambda: Worker.start("a", journal))],
                     max_restarts=1, backoff_base_s=0.0, on_event=both, metrics=metrics).start()
    metrics.track(sup)
    assert registry.get_sample_value("shopflow_supervision_actor_up", {"supervisor": "root", "child": "a"}) == 1
    assert registry.get_sample_value(
        "shopflow_supervision_mailbox_depth", {"supervisor": "root", "child": "a"}) == 0
    sup.tell("a", "crash")
    events.wait("restart")
    assert sup.wait_running("a", 5)
    sup.tell("a", "crash")
    events.wait("escalation")
    sup.stop()

    labels = {"supervisor": "root", "child": "a", "reason": "crash"}
    assert registry.get_sample_value("shopflow_supervision_restarts_total", labels) == 1
    assert registry.get_sample_value("shopflow_supervision_give_ups_total",
                                     {"supervisor": "root"}) == 1
    assert registry.get_sample_value("shopflow_supervision_escalations_total",
                                     {"supervisor": "root"}) == 1
    stream = entries(client, f"{settings.namespace}:events:supervision")
    assert [e["type"] for e in stream] == [
        "supervision.restart", "supervision.give_up", "supervision.escalation"]
    payload = json.loads(stream[0]["payload"])
    assert (payload["child"], payload["process"], payload["pid"]) == ("a", "test-process",
                                                                      os.getpid())
    alerts = entries(client, f"{settings.namespace}:events:alerts")
    assert [e["type"] for e in alerts] == ["supervision.give_up", "supervision.escalation"]


def test_processes_publish_their_tree_and_the_view_merges_it(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    journal = Journal()
    sup = Supervisor("inventory-worker-root",
                     [ChildSpec("reserver", lambda: Worker.start("r", journal))]).start()
    reporter = TreeReporter(client, settings.namespace, "inventory-worker", [sup], 5.0, 15)
    try:
        reporter.publish_once()
        key = f"{settings.namespace}:tree:process:inventory-worker:{os.getpid()}"
        assert 0 < client.ttl(key) <= 15
        snapshot = tree_snapshot(settings)
    finally:
        reporter.stop()
        sup.stop()
    assert snapshot["supervisord"]["reachable"] is False  # none runs in this test
    (proc,) = snapshot["other_processes"]
    assert proc["process"] == "inventory-worker"
    (root,) = proc["supervisors"]
    assert root["children"][0] | {"mailbox_depth": 0} == {
        "id": "reserver", "alive": True, "restarts": 0, "state": "running", "kind": "actor",
        "mailbox_depth": 0, "mailbox_size": 100, "last_exit": None, "children": []}
    view = view_tree(snapshot)
    assert (view["kind"], view["alive"]) == ("supervisord", False)
    (proc_node,) = view["children"]
    assert proc_node["kind"] == "process" and proc_node["name"].startswith("inventory-worker@")
    (sup_node,) = proc_node["children"]
    assert (sup_node["name"], sup_node["kind"], sup_node["restarts"]) == (
        "inventory-worker-root", "supervisor", 0)
    assert sup_node["children"][0]["name"] == "reserver"
    text = render_tree(snapshot)
    assert "inventory-worker-root [one_for_one, running]" in text
    assert "reserver running restarts 0 mailbox 0/100" in text
    assert client.exists(key) == 0  # a stopped process removes its entry


def test_supervisor_events_listener_speaks_the_protocol_and_raises_alerts() -> None:
    payload = "processname:stock-sync groupname:stock-sync from_state:BACKOFF"
    exited = "processname:api-1 groupname:api from_state:RUNNING expected:0 pid:42"
    events = [("PROCESS_STATE_FATAL", payload), ("PROCESS_STATE_EXITED", exited),
              ("PROCESS_STATE_EXITED", exited.replace("expected:0", "expected:1"))]
    stdin = io.StringIO("".join(
        f"ver:3.0 server:supervisor serial:{i} pool:supervisor-events poolserial:{i} "
        f"eventname:{name} len:{len(body)}\n{body}" for i, (name, body) in enumerate(events)))
    stdout = io.StringIO()
    published: list[tuple[str, dict[str, str]]] = []
    serve(stdin, stdout, lambda channel, fields: published.append((channel, fields)))
    assert stdout.getvalue() == "READY\n" + "RESULT 2\nOKREADY\n" * 3
    assert [(c, f["type"]) for c, f in published] == [
        ("alerts", "process.fatal"), ("supervision", "process.exited")]
    assert json.loads(published[0][1]["payload"])["processname"] == "stock-sync"


def test_attach_process_supervision_wires_events_metrics_and_the_tree(
        settings: Settings) -> None:
    from runtime.root import attach_process_supervision
    from tests.support import wait_until

    client = redis.Redis.from_url(settings.redis_url or "")
    journal, registry = Journal(), CollectorRegistry()
    root = Supervisor("flow-worker-root", [ChildSpec("a", lambda: Worker.start("a", journal))],
                      backoff_base_s=0.0)
    attached = attach_process_supervision(settings, "flow-worker", root,
                                          build_supervision_metrics(registry))
    root.start()
    attached.start()
    key = f"{settings.namespace}:tree:process:flow-worker:{os.getpid()}"
    try:
        wait_until(lambda: client.exists(key) == 1, 5, "the tree entry")
        root.tell("a", "crash")
        reply = client.xread({f"{settings.namespace}:events:supervision": "0"}, block=5000)
        assert reply and reply[0][1][0][1][b"type"] == b"supervision.restart"
        assert registry.get_sample_value("shopflow_supervision_restarts_total", {
            "supervisor": "flow-worker-root", "child": "a", "reason": "crash"}) == 1
    finally:
        root.stop()
        attached.stop()
    assert client.exists(key) == 0


def test_shared_metrics_count_restarts_escalations_and_sample_mailbox_depth() -> None:
    from types import SimpleNamespace

    from prometheus_client import Counter, Gauge

    from runtime.root import SharedSupervisionMetrics

    registry = CollectorRegistry()
    shared = SimpleNamespace(  # the same families runtime.metrics defines, on a private registry
        actor_restarts=Counter("shopflow_actor_restarts", "", ["actor"], registry=registry),
        supervisor_escalations=Counter("shopflow_supervisor_escalations", "", ["supervisor"],
                                       registry=registry),
        mailbox_depth=Gauge("shopflow_mailbox_depth", "", ["actor"], registry=registry),
    )
    sink = SharedSupervisionMetrics(shared)
    events, journal = Events(), Journal()
    sup = Supervisor("root", [ChildSpec("a", lambda: Worker.start("a", journal))],
                     max_restarts=1, backoff_base_s=0.0, on_event=events, metrics=sink).start()
    sink.track(sup)
    sink.refresh()
    assert registry.get_sample_value("shopflow_mailbox_depth", {"actor": "root/a"}) == 0
    sup.tell("a", "crash")
    events.wait("restart")
    assert sup.wait_running("a", 5)
    sup.tell("a", "crash")
    events.wait("escalation")
    sup.stop()
    assert registry.get_sample_value("shopflow_actor_restarts_total", {"actor": "root/a"}) == 1
    assert registry.get_sample_value("shopflow_supervisor_escalations_total",
                                     {"supervisor": "root"}) == 1


def test_shared_metrics_count_give_ups_and_start_failures_behind_metrics(
        settings: Settings) -> None:
    """A runtime process's own sink (get_metrics) counts every kind an operator alerts on."""
    from runtime.metrics import get_metrics
    from runtime.root import SharedSupervisionMetrics
    from tests.runtime.metrics_helpers import scrape, value

    sink = SharedSupervisionMetrics(get_metrics(settings))
    events, journal = Events(), Journal()
    failing = {"on": False}

    def start_b() -> Any:
        return Worker.start("b", journal, fail_start=failing["on"])

    sup = Supervisor("proc-root", [ChildSpec("a", lambda: Worker.start("a", journal)),
                                   ChildSpec("b", start_b)],
                     max_restarts=1, backoff_base_s=0.0, on_event=events, metrics=sink).start()
    failing["on"] = True  # from now on b cannot start: its restart fails
    sup.tell("b", "crash")
    events.wait("start_failed")
    events.wait("give_up")
    events.wait("escalation")
    sup.stop()

    samples = scrape(settings)
    assert value(samples, "shopflow_actor_start_failures_total", actor="proc-root/b") == 1
    assert value(samples, "shopflow_supervisor_give_ups_total", supervisor="proc-root") == 1
    assert value(samples, "shopflow_supervisor_escalations_total", supervisor="proc-root") == 1
    assert value(samples, "shopflow_actor_restarts_total", actor="proc-root/b") >= 1


def test_the_tree_reporter_is_the_roots_supervised_child(settings: Settings) -> None:
    """attach_process_supervision puts the reporter under the root: last child, restarted
    after a crash (an event like any restart) and publishing again; a stop removes the
    process's entry."""
    client = redis.Redis.from_url(settings.redis_url or "")
    journal = Journal()
    root = Supervisor("flow-worker-root", [ChildSpec("a", lambda: Worker.start("a", journal))],
                      backoff_base_s=0.0)
    reporting = attach_process_supervision(settings, "flow-worker", root)
    key = process_key(settings.namespace, "flow-worker", os.getpid())
    try:
        root.start()
        reporting.start()
        assert [c.id for c in root.snapshot()] == ["a", TREE_REPORTER_CHILD]
        wait_until(lambda: bool(client.exists(key)), 10, "the first publish")
        root.tell(TREE_REPORTER_CHILD, "not a tick")  # a bug in the reporter: it crashes
        restart = next_supervision_event(settings, "restart", TREE_REPORTER_CHILD)
        assert restart["process"] == "flow-worker" and "TypeError" in restart["reason"]
        assert root.wait_running(TREE_REPORTER_CHILD, 10)
        client.delete(key)
        wait_until(lambda: bool(client.exists(key)), 10, "the restarted reporter to publish")
        published = json.loads(client.hget(key, "supervisors") or b"[]")
        assert [c["restarts"] for c in published[0]["children"]] == [0, 1]
    finally:
        root.stop()
        reporting.stop()
    assert client.exists(key) == 0


def test_the_reporter_publishes_again_soon_while_its_root_is_still_starting(
        settings: Settings) -> None:
    """A snapshot taken while the root starts (the reporter is its last child) is followed
    by another within STARTING_REPUBLISH_S, not an interval later; a running root waits
    the whole interval."""
    client = redis.Redis.from_url(settings.redis_url or "")
    journal = Journal()
    release = threading.Event()

    def slow_start() -> Any:
        release.wait(10)
        return Worker.start("slow", journal)

    root = Supervisor("flow-worker-root", [ChildSpec("slow", slow_start)])
    reporter = TreeReporter(client, settings.namespace, "flow-worker", [root], 30.0, 60)
    starter = threading.Thread(target=root.start)
    starter.start()
    try:
        wait_until(lambda: root.state == "starting", 10, "the root to be starting")
        assert reporter.next_tick_s() == STARTING_REPUBLISH_S
        release.set()
        starter.join(10)
        assert root.state == "running"
        assert reporter.next_tick_s() == 30.0
    finally:
        release.set()
        starter.join(10)
        root.stop()
        client.close()


def test_each_program_row_of_the_tree_says_its_pid_once() -> None:
    """supervisord's description of a running program is "pid N, uptime ..." already;
    a stopping one has a pid and no description, a stopped one no pid."""
    def program(name: str, state: str, pid: int, description: str) -> dict[str, Any]:
        return {"name": name, "group": name, "state": state, "pid": pid or None,
                "uptime_s": 41, "exitstatus": 0, "description": description,
                "supervisors": []}

    snapshot = {"at": "now", "supervisord": {"reachable": True, "state": "RUNNING"},
                "other_processes": [], "redis_error": None, "processes": [
                    program("agents-worker", "RUNNING", 17092, "pid 17092, uptime 0:00:41"),
                    program("stock-sync", "STOPPING", 17093, ""),
                    program("crasher", "FATAL", 0, "Exited too quickly (process log may "
                                                   "have details)"),
                    program("reports", "STOPPED", 0, "Not started")]}
    rows = render_tree(snapshot).splitlines()[1:]
    assert [row.split(None, 3)[3] for row in rows] == [
        "pid 17092, uptime 0:00:41",
        "pid 17093",
        "pid -  Exited too quickly (process log may have details)",
        "pid -  Not started"]
