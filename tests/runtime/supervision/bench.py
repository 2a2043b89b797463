"""Micro-benchmarks for docs/supervision.md: ``python -m tests.runtime.supervision.bench``."""

from __future__ import annotations

import statistics
import time
from typing import Any

import pykka

from runtime.actor import AsyncActor, SupervisedActor
from runtime.loop import LoopBridge
from runtime.supervision import ChildSpec, Supervisor

from .helpers import Events

ASKS = 20_000
RESTARTS = 200


class Echo(SupervisedActor):
    def on_receive(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError("crash")
        return message


class PlainEcho(pykka.ThreadingActor):
    use_daemon_thread = True

    def on_receive(self, message: Any) -> Any:
        return message


class AsyncEcho(AsyncActor):
    async def on_receive(self, message: Any) -> Any:
        return message


def per_ask_us(ask: Any) -> float:
    start = time.perf_counter()
    for i in range(ASKS):
        ask(i)
    return (time.perf_counter() - start) / ASKS * 1e6


def main() -> None:
    bridge = LoopBridge().start()
    events = Events()
    sup = Supervisor("bench", [ChildSpec("echo", Echo.start),
                               ChildSpec("async", lambda: AsyncEcho.start(bridge))],
                     max_restarts=RESTARTS * 2, backoff_base_s=0.0, on_event=events).start()
    plain = PlainEcho.start()
    print(f"plain pykka ref.ask:        {per_ask_us(lambda m: plain.ask(m, timeout=5)):.1f} µs/ask")
    print(f"Supervisor.ask (threaded):  {per_ask_us(lambda m: sup.ask('echo', m, 5)):.1f} µs/ask")
    print(f"Supervisor.ask (async):     {per_ask_us(lambda m: sup.ask('async', m, 5)):.1f} µs/ask")
    gaps = []
    for _ in range(RESTARTS):
        start = time.perf_counter()
        sup.tell("echo", "crash")
        events.wait("restart")
        sup.wait_running("echo", 5)
        gaps.append((time.perf_counter() - start) * 1000)
    print(f"crash -> running again:     median {statistics.median(gaps):.2f} ms, "
          f"p95 {sorted(gaps)[int(len(gaps) * 0.95)]:.2f} ms ({RESTARTS} restarts, no back-off)")
    plain.stop()
    sup.stop()
    bridge.stop()


if __name__ == "__main__":
    main()
