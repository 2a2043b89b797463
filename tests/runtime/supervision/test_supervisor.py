"""Strategies, restart types, intensity, back-off, ordering and start failures."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from runtime.errors import (
    ActorCrashed,
    ActorUnavailable,
    SupervisorGaveUp,
    SupervisorStartError,
    ValidationError,
)
from runtime.supervision import (
    ChildSpec,
    Restart,
    Strategy,
    Supervisor,
    restart_delay_s,
    restart_set,
)

from .helpers import Events, Journal, Worker


def spec(name: str, journal: Journal, restart: Restart = Restart.PERMANENT,
         **kwargs: Any) -> ChildSpec:
    return ChildSpec(name, lambda: Worker.start(name, journal, **kwargs), restart=restart)


def started(name: str, times: int) -> Any:
    return lambda items: items.count(("start", name)) >= times


def running(sup: Supervisor, *names: str) -> None:
    for name in names:
        assert sup.wait_running(name, 5.0), f"{name} did not come back"


@pytest.fixture
def journal() -> Journal:
    return Journal()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def make_sup(journal: Journal, events: Events) -> Iterator[Any]:
    made: list[Supervisor] = []

    def make(strategy: Strategy = Strategy.ONE_FOR_ONE, children: list[ChildSpec] | None = None,
             **kwargs: Any) -> Supervisor:
        kwargs.setdefault("backoff_base_s", 0.0)
        sup = Supervisor("root", children or [spec(n, journal) for n in "abc"],
                         strategy=strategy, on_event=events, **kwargs)
        made.append(sup.start())
        return sup

    yield make
    for sup in made:
        sup.stop()


def test_children_start_in_order_and_stop_in_reverse(make_sup: Any, journal: Journal) -> None:
    sup = make_sup()
    assert journal.items == [("start", "a"), ("start", "b"), ("start", "c")]
    assert sup.ask("b", "ping", timeout_s=2) == "pong from b"
    sup.stop()
    assert journal.items[3:] == [("stop", "c"), ("stop", "b"), ("stop", "a")]


def test_one_for_one_restarts_only_the_crashed_child(make_sup: Any, journal: Journal,
                                                     events: Events) -> None:
    sup = make_sup(Strategy.ONE_FOR_ONE)
    sup.tell("b", "crash")
    event = events.wait("restart")
    assert (event.child, event.restarts) == ("b", 1)
    assert event.reason.startswith("crash: RuntimeError")
    items = journal.wait_for(started("b", 2))
    assert items[3:] == [("start", "b")]
    running(sup, "b")
    assert sup.ask("b", "ping", timeout_s=2) == "pong from b"
    assert [(c.id, c.restarts, c.state) for c in sup.snapshot()] == [
        ("a", 0, "running"), ("b", 1, "running"), ("c", 0, "running")]


def test_one_for_all_stops_others_in_reverse_then_starts_all_in_order(
        make_sup: Any, journal: Journal) -> None:
    sup = make_sup(Strategy.ONE_FOR_ALL)
    sup.tell("b", "crash")
    items = journal.wait_for(started("c", 2))
    assert items[3:] == [("stop", "c"), ("stop", "a"),
                         ("start", "a"), ("start", "b"), ("start", "c")]
    running(sup, "a")
    assert sup.ask("a", "ping", timeout_s=2) == "pong from a"


def test_rest_for_one_restarts_the_crashed_child_and_those_after_it(
        make_sup: Any, journal: Journal) -> None:
    sup = make_sup(Strategy.REST_FOR_ONE)
    sup.tell("b", "crash")
    items = journal.wait_for(started("c", 2))
    assert items[3:] == [("stop", "c"), ("start", "b"), ("start", "c")]
    running(sup, "c")
    assert [c.restarts for c in sup.snapshot()] == [0, 1, 0]


def test_restart_set_table() -> None:
    ids = ["a", "b", "c"]
    assert restart_set(Strategy.ONE_FOR_ONE, ids, "b") == ["b"]
    assert restart_set(Strategy.ONE_FOR_ALL, ids, "b") == ["a", "b", "c"]
    assert restart_set(Strategy.REST_FOR_ONE, ids, "b") == ["b", "c"]
    assert restart_set(Strategy.REST_FOR_ONE, ids, "a") == ["a", "b", "c"]


def test_transient_child_comes_back_after_a_crash_but_not_after_a_normal_exit(
        make_sup: Any, journal: Journal, events: Events) -> None:
    sup = make_sup(children=[spec("t", journal, Restart.TRANSIENT)])
    sup.tell("t", "crash")
    journal.wait_for(started("t", 2))
    running(sup, "t")
    sup.tell("t", "stop-self")
    event = events.wait("child_exit")
    assert (event.child, event.reason) == ("t", "normal")
    assert sup.snapshot()[0].state == "exited"
    with pytest.raises(ActorUnavailable):
        sup.ask("t", "ping", timeout_s=1)


def test_permanent_child_comes_back_even_after_a_normal_exit(
        make_sup: Any, journal: Journal, events: Events) -> None:
    sup = make_sup(children=[spec("p", journal)])
    sup.tell("p", "stop-self")
    assert events.wait("restart").reason == "normal"
    journal.wait_for(started("p", 2))
    running(sup, "p")
    assert sup.ask("p", "ping", timeout_s=2) == "pong from p"


def test_temporary_child_is_never_restarted_and_asks_to_it_fail_fast(
        make_sup: Any, journal: Journal, events: Events) -> None:
    sup = make_sup(children=[spec("tmp", journal, Restart.TEMPORARY), spec("p", journal)])
    sup.tell("tmp", "crash")
    assert events.wait("child_exit").child == "tmp"
    with pytest.raises(ActorUnavailable, match="not running"):
        sup.ask("tmp", "ping", timeout_s=30)
    assert sup.ask("p", "ping", timeout_s=2) == "pong from p"


def test_temporary_sibling_is_not_restarted_by_one_for_all(
        make_sup: Any, journal: Journal) -> None:
    sup = make_sup(Strategy.ONE_FOR_ALL,
                   children=[spec("tmp", journal, Restart.TEMPORARY), spec("p", journal)])
    sup.tell("p", "crash")
    journal.wait_for(started("p", 2))
    running(sup, "p")
    assert journal.count(("start", "tmp")) == 1
    assert [c.state for c in sup.snapshot()] == ["stopped", "running"]


def test_a_crash_in_an_ask_answers_actor_crashed_and_fails_the_queued_asks(
        make_sup: Any, journal: Journal) -> None:
    gate = threading.Event()
    sup = make_sup(children=[ChildSpec("w", lambda: Worker.start("w", journal, gate=gate))])
    ref = sup.child_ref("w")
    held = ref.ask("wait-gate", block=False)
    journal.wait_for(lambda items: ("holding", "w") in items)
    crashing = ref.ask("crash", block=False)
    queued = ref.ask("ping", block=False)
    gate.set()
    assert held.get(timeout=2) == "released"
    with pytest.raises(ActorCrashed) as info:
        crashing.get(timeout=2)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(Exception) as dead:
        queued.get(timeout=2)
    assert type(dead.value).__name__ == "ActorDeadError"
    journal.wait_for(started("w", 2))


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt()],
                         ids=["SystemExit", "KeyboardInterrupt"])
def test_a_base_exception_in_a_handler_is_a_crash_the_supervisor_restarts(
        make_sup: Any, journal: Journal, events: Events, error: BaseException) -> None:
    """Not only Exceptions: the mailbox closes, every ask gets its answer at once (none waits
    for its timeout) and the supervisor hears of the exit and restarts the child."""
    gate = threading.Event()
    sup = make_sup(children=[ChildSpec("w", lambda: Worker.start("w", journal, gate=gate))])
    ref = sup.child_ref("w")
    held = ref.ask("wait-gate", block=False)
    journal.wait_for(lambda items: ("holding", "w") in items)
    crashing = ref.ask(error, block=False)
    queued = ref.ask("ping", block=False)
    gate.set()
    assert held.get(timeout=2) == "released"
    with pytest.raises(ActorCrashed) as info:
        crashing.get(timeout=2)
    assert info.value.__cause__ is error
    with pytest.raises(pykka.ActorDeadError):
        queued.get(timeout=2)
    assert type(error).__name__ in events.wait("restart").reason
    journal.wait_for(started("w", 2))
    assert sup.ask("w", "ping", timeout_s=2) == "pong from w"


def test_a_base_exception_in_on_start_is_a_start_failure_at_once(journal: Journal) -> None:
    """Reported as the child's start failure, not found out by the start timeout."""

    class ExitsOnStart(Worker):
        def on_start(self) -> None:
            raise SystemExit("no")

    sup = Supervisor("root", [ChildSpec("w", lambda: ExitsOnStart.start("w", journal),
                                        start_timeout_s=10.0)])
    with pytest.raises(SupervisorStartError, match="SystemExit"):
        sup.start()


def test_domain_errors_go_back_to_the_caller_and_the_actor_lives_on(
        make_sup: Any, journal: Journal, events: Events) -> None:
    sup = make_sup(children=[spec("w", journal)])
    with pytest.raises(ValidationError):
        sup.ask("w", ValidationError("bad input"), timeout_s=2)
    assert sup.ask("w", "ping", timeout_s=2) == "pong from w"
    assert events.all == []


def test_an_actor_can_mark_itself_failed(make_sup: Any, journal: Journal,
                                         events: Events) -> None:
    sup = make_sup(children=[spec("w", journal)])
    with pytest.raises(ActorCrashed):
        sup.ask("w", "fail-self", timeout_s=2)
    assert "gave up on purpose" in events.wait("restart").reason


def test_intensity_exceeded_stops_children_in_reverse_and_escalates(
        make_sup: Any, journal: Journal, events: Events) -> None:
    escalated: list[BaseException] = []
    sup = make_sup(max_restarts=2, max_seconds=60, on_escalate=escalated.append)
    for n in (2, 3):
        sup.tell("b", "crash")
        journal.wait_for(started("b", n))
        running(sup, "b")
    sup.tell("b", "crash")
    give_up = events.wait("give_up")
    assert "more than 2 restarts" in give_up.reason
    assert events.wait("escalation").supervisor == "root"
    assert isinstance(escalated[0], SupervisorGaveUp)
    assert journal.items[-2:] == [("stop", "c"), ("stop", "a")]
    assert not sup.actor_ref.is_alive() or sup.actor_ref.actor_stopped.wait(2)
    with pytest.raises(ActorUnavailable):
        sup.ask("a", "ping", timeout_s=1)


def test_restarts_outside_the_window_do_not_count() -> None:
    now = [0.0]
    journal, events = Journal(), Events()
    sup = Supervisor("root", [spec("a", journal)], max_restarts=1, max_seconds=10,
                     backoff_base_s=0.0, on_event=events, clock=lambda: now[0]).start()
    try:
        for n in range(2, 5):
            now[0] += 11
            sup.tell("a", "crash")
            journal.wait_for(started("a", n))
            running(sup, "a")
        assert sup.snapshot()[0].restarts == 3
        sup.tell("a", "crash")  # second restart within 10 s: give up
        events.wait("give_up")
    finally:
        sup.stop()


def test_nested_supervisor_gives_up_and_its_parent_restarts_it(journal: Journal,
                                                               events: Events) -> None:
    def inner() -> Supervisor:
        return Supervisor("inner", [spec("x", journal)], max_restarts=0, backoff_base_s=0.0)

    outer = Supervisor("outer", [ChildSpec.of_supervisor("inner", inner), spec("y", journal)],
                       on_event=events, backoff_base_s=0.0).start()
    try:
        assert outer.ask("inner/x", "ping", timeout_s=2) == "pong from x"
        outer.tell("inner/x", "crash")
        give_up = events.wait("give_up")
        assert give_up.supervisor == "outer/inner"
        restart = events.wait("restart")
        assert (restart.supervisor, restart.child) == ("outer", "inner")
        assert "SupervisorGaveUp" in restart.reason
        journal.wait_for(started("x", 2))
        running(outer, "inner")
        assert outer.ask("inner/x", "ping", timeout_s=2) == "pong from x"
        tree = outer.describe()
        assert tree["children"][0]["kind"] == "supervisor"
        assert tree["children"][0]["children"][0]["id"] == "x"
    finally:
        outer.stop()
    assert journal.items[-2:] == [("stop", "y"), ("stop", "x")]


def test_start_failure_names_the_child_and_stops_those_already_started(
        journal: Journal, events: Events) -> None:
    sup = Supervisor("root", [spec("a", journal), spec("b", journal, fail_start=True),
                              spec("c", journal)], on_event=events)
    with pytest.raises(SupervisorStartError, match="'root' could not start child 'b'"):
        sup.start()
    assert journal.items == [("start", "a"), ("start_failed", "b"), ("stop", "a")]
    assert events.wait("start_failed").child == "b"


def test_restart_delay_grows_and_is_capped() -> None:
    assert [restart_delay_s(n, 0.1, 1.0) for n in range(1, 7)] == [
        0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert restart_delay_s(3, 0.0, 1.0) == 0.0


def test_a_child_failing_at_every_restart_backs_off_then_the_supervisor_gives_up(
        journal: Journal, events: Events) -> None:
    attempts = [0]

    def start() -> Any:
        attempts[0] += 1
        return Worker.start("f", journal, fail_start=attempts[0] > 1)

    sup = Supervisor("root", [ChildSpec("f", start)], max_restarts=3, max_seconds=60,
                     backoff_base_s=0.01, on_event=events).start()
    sup.tell("f", "crash")
    delays = [events.wait("restart").delay_s for _ in range(3)]
    assert delays == [0.01, 0.02, 0.04]
    events.wait("give_up")
    sup.stop()


def test_back_off_resets_after_a_quiet_period(journal: Journal, events: Events) -> None:
    now = [0.0]
    sup = Supervisor("root", [spec("a", journal)], max_restarts=10, backoff_base_s=0.001,
                     backoff_reset_s=30, on_event=events, clock=lambda: now[0]).start()
    try:
        sup.tell("a", "crash")
        assert events.wait("restart").delay_s == 0.001
        journal.wait_for(started("a", 2))
        running(sup, "a")
        sup.tell("a", "crash")
        assert events.wait("restart").delay_s == 0.002
        journal.wait_for(started("a", 3))
        running(sup, "a")
        now[0] += 31  # quiet period
        sup.tell("a", "crash")
        assert events.wait("restart").delay_s == 0.001
    finally:
        sup.stop()


class Plain(pykka.ThreadingActor):
    """A plain pykka actor (like the lead's ServiceActor): pykka's own semantics."""

    use_daemon_thread = True

    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self.journal = journal

    def on_start(self) -> None:
        self.journal.add(("start", "plain"))

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Exception):
            raise message
        return "plain pong"


def test_plain_pykka_actors_are_supervised_too(journal: Journal, events: Events) -> None:
    sup = Supervisor("root", [ChildSpec("p", lambda: Plain.start(journal))],
                     backoff_base_s=0.0, on_event=events).start()
    try:
        with pytest.raises(KeyError):  # an ask's exception goes back; the actor lives on
            sup.ask("p", KeyError("x"), timeout_s=2)
        assert sup.ask("p", "ping", timeout_s=2) == "plain pong"
        assert sup.snapshot()[0].mailbox_depth == 0
        sup.tell("p", RuntimeError("crash in a tell"))  # pykka stops the actor
        assert events.wait("restart").child == "p"
        journal.wait_for(started("plain", 2))
        running(sup, "p")
        assert sup.ask("p", "ping", timeout_s=2) == "plain pong"
    finally:
        sup.stop()


def test_a_bug_in_the_supervisor_itself_stops_its_children_and_escalates(
        make_sup: Any, journal: Journal, events: Events) -> None:
    escalated: list[BaseException] = []
    sup = make_sup(on_escalate=escalated.append)
    sup.actor_ref.tell("not a supervisor message")
    assert "unknown message" in events.wait("escalation").reason
    assert isinstance(escalated[0], TypeError)
    assert journal.items[3:] == [("stop", "c"), ("stop", "b"), ("stop", "a")]


class SlowToStop(Worker):
    """A child whose on_stop hangs until ``release`` is set (a stuck cleanup)."""

    def __init__(self, name: str, journal: Journal, release: threading.Event) -> None:
        super().__init__(name, journal)
        self.release = release

    def on_stop(self) -> None:
        self.journal.add(("stopping", self.name))
        self.release.wait(120)
        self.journal.add(("stop", self.name))


def test_a_child_overrunning_its_shutdown_timeout_is_abandoned_and_logged(
        journal: Journal, caplog: pytest.LogCaptureFixture) -> None:
    """shutdown_timeout_s bounds the stop: the stuck child is left, the rest still stop."""
    release = threading.Event()
    sup = Supervisor("root", [
        spec("a", journal),
        ChildSpec("stuck", lambda: SlowToStop.start("stuck", journal, release),
                  shutdown_timeout_s=0.5),
    ]).start()
    stopper = threading.Thread(target=sup.stop, name="stopper")
    try:
        with caplog.at_level("ERROR", logger="runtime.supervision"):
            stopper.start()
            stopper.join(30)  # the stuck on_stop alone would hold it for 120 s
            assert not stopper.is_alive(), "the supervisor's stop did not finish"
        items = journal.items
        assert ("stopping", "stuck") in items and ("stop", "stuck") not in items
        assert items[-1] == ("stop", "a")  # stopped after the stuck child was abandoned
        assert sup.state == "stopped"
        assert "actor root/stuck did not stop within 0.5s; abandoning its thread" in caplog.text
    finally:
        release.set()
        stopper.join(30)
