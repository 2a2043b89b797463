"""A tiny process with a root supervisor, run by the tests as a subprocess.

``python -m tests.runtime.supervision.program MODE``:

- ``serve``: run_root with three children; prints ``ready``; exits 0 on SIGTERM
  after printing the stops (reverse order);
- ``crashloop``: run_root with a child that crashes once and then fails every
  restart; the root gives up and the process exits 70;
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

STARTS: dict[str, int] = {}


class Child(SupervisedActor):
    """With ``fragile``, every start after the first fails (a crash loop)."""

    def __init__(self, name: str, fragile: bool = False) -> None:
        super().__init__()
        self.name = name
        self.fragile = fragile

    def on_start(self) -> None:
        STARTS[self.name] = STARTS.get(self.name, 0) + 1
        if self.fragile and STARTS[self.name] > 1:
            raise RuntimeError(f"{self.name} cannot start again")
        print(f"start {self.name}", flush=True)

    def on_stop(self) -> None:
        print(f"stop {self.name}", flush=True)

    def on_receive(self, message: Any) -> Any:
        raise RuntimeError(f"{self.name} crashes")


def child(name: str, fragile: bool = False) -> ChildSpec:
    return ChildSpec(name, lambda: Child.start(name, fragile))


def main(mode: str) -> int:
    setup_logging("WARNING")
    if mode == "serve":
        root = Supervisor("root", [child("a"), child("b"), child("c")])
        return run_root(root, ready=lambda: print("ready", flush=True))
    crashing = Supervisor("root", [child("a"), child("b", fragile=True)], max_restarts=2,
                          max_seconds=30, backoff_base_s=0.001)
    if mode == "crashloop":
        return run_root(crashing, ready=lambda: crashing.tell("b", "crash"))
    crashing.add_escalation_hook(exit_process_on_escalate())
    crashing.start()
    crashing.tell("b", "crash")
    threading.Event().wait()  # the "worker" owns the main thread forever
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
