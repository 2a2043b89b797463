"""A tiny process with a root supervisor, run by the tests as a subprocess.

``python -m tests.runtime.supervision.program MODE``:

- ``serve``: run_root with three children; prints ``ready``; exits 0 on SIGTERM
  after printing the stops (reverse order);
- ``crashloop``: run_root with a child that crashes right after every start;
  the root gives up and the process exits 70;
- ``crashloop-hook``: the same, but the main thread is busy elsewhere (as in a
  Dramatiq worker) and ``exit_process_on_escalate`` ends the process.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from runtime.actor import SupervisedActor
from runtime.logs import setup_logging
from runtime.root import exit_process_on_escalate, run_root
from runtime.supervision import ChildSpec, Supervisor


class Child(SupervisedActor):
    def __init__(self, name: str, crash_after_start: bool = False) -> None:
        super().__init__()
        self.name = name
        self.crash_after_start = crash_after_start

    def on_start(self) -> None:
        print(f"start {self.name}", flush=True)
        if self.crash_after_start:
            self.actor_ref.tell("crash")

    def on_stop(self) -> None:
        print(f"stop {self.name}", flush=True)

    def on_receive(self, message: Any) -> Any:
        raise RuntimeError(f"{self.name} crashes")


def child(name: str, crash: bool = False) -> ChildSpec:
    return ChildSpec(name, lambda: Child.start(name, crash))


def main(mode: str) -> int:
    setup_logging("WARNING")
    if mode == "serve":
        root = Supervisor("root", [child("a"), child("b"), child("c")])
        return run_root(root, ready=lambda: print("ready", flush=True))
    crashing = Supervisor("root", [child("a"), child("b", crash=True)], max_restarts=2,
                          max_seconds=30, backoff_base_s=0.001)
    if mode == "crashloop":
        return run_root(crashing)
    crashing.add_escalation_hook(exit_process_on_escalate())
    crashing.start()
    threading.Event().wait()  # the "worker" owns the main thread forever
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
