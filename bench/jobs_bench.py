"""The no-op job phases, run for one peer at a time against the shared Redis.

For each peer, on its own Redis database (flushed first):

1. enqueue: with no worker running, send ``jobs`` jobs one by one from one
   thread with the peer's ordinary client call -> enqueue rate (median of
   five equal chunks);
2. drain: start the worker (one process, 8 slots) on that backlog -> drain
   rate = jobs started per second between the first and the last start
   (worker start-up excluded);
3. steady: send at a fixed ``rate_hz`` for ``steady_s`` -> enqueue-to-start
   latency p50/p99;
4. idle: after ``idle_s`` without jobs, send one -> first-job-after-idle
   latency (``idle_samples`` times; the median is reported).
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis

from bench.harness import BenchEnv, Peer, Producer
from bench.worker import env_vars

QUEUE = "bench"
WORKER_STOP_TIMEOUT_S = 15.0
COLLECT_POLL_S = 0.02
# The enqueue phase is timed in this many chunks; the median chunk rate is reported.
ENQUEUE_CHUNKS = 5


@dataclass(frozen=True)
class JobsConfig:
    """Sizes of the phases (command-line options of ``bench.run``)."""

    jobs: int = 5_000
    rate_hz: float = 200.0
    steady_s: float = 10.0
    idle_s: float = 5.0
    idle_samples: int = 3
    drain_timeout_s: float = 120.0


@dataclass
class PeerResult:
    """One peer's figures (None where a phase did not complete)."""

    key: str
    name: str
    setup: str
    skipped: str | None = None
    enqueue_per_s: float | None = None
    drain_per_s: float | None = None
    startup_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    steady_sent_per_s: float | None = None
    idle_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def idle_median_ms(self) -> float | None:
        return statistics.median(self.idle_ms) if self.idle_ms else None


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


class Records:
    """Reads the start records the job body ships to the results list."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self._client = client
        self._key = key

    def reset(self) -> None:
        self._client.delete(self._key)

    def wait_for(self, expected: int, timeout_s: float, since: float = 0.0) -> list[tuple[float, float]]:
        """Wait until ``expected`` records of jobs enqueued at/after ``since`` arrived, then take them."""
        deadline = time.monotonic() + timeout_s
        while cast(int, self._client.llen(self._key)) < expected and time.monotonic() < deadline:
            time.sleep(COLLECT_POLL_S)
        raw = cast(list[bytes], self._client.lrange(self._key, 0, -1))
        self._client.delete(self._key)
        pairs = [tuple(map(float, item.split())) for item in raw]
        return [(enq, start) for enq, start in pairs if enq >= since]


def start_worker(peer: Peer, env: BenchEnv, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m bench.worker <peer>`` in its own session (its pool children too)."""
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "bench.worker", peer.key],
        env={**os.environ, **env_vars(env)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the worker we started; SIGKILL its session if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we created: the worker and its children
    except ProcessLookupError:
        pass
    proc.wait()


def run_peer(peer: Peer, env: BenchEnv, results: redis.Redis, cfg: JobsConfig,
             log_dir: Path) -> PeerResult:
    """All four phases for one peer; a failure of one phase is noted, not fatal."""
    out = PeerResult(peer.key, peer.name, peer.setup)
    reason = peer.unavailable()
    if reason:
        out.skipped = reason
        return out
    redis.Redis.from_url(env.redis_url).flushdb()
    records = Records(results, env.results_key)
    records.reset()
    producer = peer.open_producer(env)
    proc: subprocess.Popen[bytes] | None = None
    try:
        out.enqueue_per_s = _enqueue_rate(producer, cfg.jobs)
        started_at = time.time()
        proc = start_worker(peer, env, log_dir / f"worker-{peer.key}.log")
        _drain(out, records, cfg, started_at)
        _steady(out, producer, records, cfg)
        _idle(out, producer, records, cfg)
    except Exception as exc:  # noqa: BLE001 - a peer that breaks loses its row, not the run
        out.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        if proc is not None:
            stop_worker(proc)
            if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL, 1):
                out.problems.append(f"worker exited with {proc.returncode}")
        producer.close()
    return out


def _enqueue_rate(producer: Producer, jobs: int) -> float:
    """Median rate over ENQUEUE_CHUNKS equal chunks: one stall of a shared machine moves it less."""
    size = max(1, jobs // ENQUEUE_CHUNKS)
    rates = []
    for done in range(0, jobs, size):
        count = min(size, jobs - done)
        rates.append(count / producer.send_many(count, None))
    return statistics.median(rates)


def _drain(out: PeerResult, records: Records, cfg: JobsConfig, started_at: float) -> None:
    got = records.wait_for(cfg.jobs, cfg.drain_timeout_s)
    if len(got) < cfg.jobs:
        out.problems.append(f"drain: {len(got)} of {cfg.jobs} jobs started within {cfg.drain_timeout_s}s")
    if len(got) < 2:
        return
    starts = sorted(start for _, start in got)
    out.startup_s = starts[0] - started_at
    out.drain_per_s = (len(starts) - 1) / max(starts[-1] - starts[0], 1e-9)


def _steady(out: PeerResult, producer: Producer, records: Records, cfg: JobsConfig) -> None:
    count = int(cfg.rate_hz * cfg.steady_s)
    since = time.time()
    elapsed_s = producer.send_many(count, cfg.rate_hz)
    out.steady_sent_per_s = count / elapsed_s
    got = records.wait_for(count, cfg.steady_s + 30.0, since)
    if len(got) < count:
        out.problems.append(f"steady: {len(got)} of {count} jobs started")
    if got:
        latencies_ms = [(start - enq) * 1000 for enq, start in got]
        out.p50_ms = percentile(latencies_ms, 50)
        out.p99_ms = percentile(latencies_ms, 99)


def _idle(out: PeerResult, producer: Producer, records: Records, cfg: JobsConfig) -> None:
    for _ in range(cfg.idle_samples):
        time.sleep(cfg.idle_s)  # the point of the phase: the worker sits idle this long
        since = time.time()
        producer.send_many(1, None)
        got = records.wait_for(1, 30.0, since)
        if not got:
            out.problems.append("idle: the job did not start within 30 s")
            return
        enq, start = got[0]
        out.idle_ms.append((start - enq) * 1000)
