"""A process that counts jobs in the multiprocess metrics directory (run with ``python -m``).

Settings come from the environment (a process edge). It adds ``WRITER_JOBS``
(default 1) completed jobs of actor ``metrics_writer``, prints ``ready``, and
then, unless ``--once``, waits for SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from runtime.metrics import get_metrics
from runtime.settings import Settings

ACTOR = "metrics_writer"


def main() -> int:
    metrics = get_metrics(Settings.from_env())
    metrics.jobs.labels("emails", ACTOR, "completed").inc(int(os.environ.get("WRITER_JOBS", "1")))
    print("ready", flush=True)
    if "--once" in sys.argv:
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
