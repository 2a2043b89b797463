"""The ceiling: redis-benchmark against the same server the peers used.

``-c 1`` (one client, no pipelining) is the round-trip bound of one producer
thread, the fair ceiling for a per-job enqueue rate; ``-c 50`` (its default)
is what the server does with many clients. The binary comes from the OS
(Debian: ``apt-get install redis-tools``); without it the row is skipped.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from dataclasses import dataclass, field

TESTS = ("SET", "LPUSH", "RPOP")
CLIENTS = (1, 50)
REQUESTS = 50_000
DBNUM = 15  # away from the peers' databases
# One redis-benchmark run takes a few seconds; it never returns if the server is gone.
RUN_TIMEOUT_S = 120


@dataclass
class CeilingResult:
    """Requests per second by (test, clients); ``skipped`` says why there are none."""

    rps: dict[tuple[str, int], float] = field(default_factory=dict)
    version: str = ""
    skipped: str | None = None


def run(port: int) -> CeilingResult:
    """Run redis-benchmark if it is installed (never installs anything)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return CeilingResult(skipped="redis-benchmark not found (Debian: apt-get install redis-tools)")
    out = CeilingResult()
    out.version = subprocess.run([binary, "--version"], check=False, capture_output=True,
                                 text=True).stdout.strip()
    for clients in CLIENTS:
        print(f"[ceiling] redis-benchmark -c {clients} ...", flush=True)
        try:
            proc = subprocess.run(
                [binary, "-h", "127.0.0.1", "-p", str(port), "--dbnum", str(DBNUM), "-c", str(clients),
                 "-n", str(REQUESTS), "-t", ",".join(t.lower() for t in TESTS), "--csv"],
                capture_output=True, text=True, check=True, timeout=RUN_TIMEOUT_S,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            out.skipped = f"redis-benchmark failed: {exc}"
            return out
        for row in csv.reader(io.StringIO(proc.stdout)):
            if row and row[0] in TESTS:
                out.rps[(row[0], clients)] = float(row[1])
    return out
