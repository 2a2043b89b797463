"""The no-op job phases, run for one peer at a time against the shared Redis.

For each peer, on its own Redis database (flushed first):

1. enqueue: with no worker running, send ``jobs`` jobs one by one from one
   thread with the peer's ordinary client call -> enqueue rate (median of
   five equal chunks per round);
2. drain: start the worker (one process, 8 slots) on that backlog -> drain
   rate = jobs started per second between the first and the last start
   (worker start-up excluded). Steps 1 and 2 are repeated ``drain_rounds``
   times with a fresh worker each time and the median round is reported: a
   few seconds of drain are easily disturbed on a shared machine;
3. steady: send at a fixed ``rate_hz`` for ``steady_s`` -> enqueue-to-start
   latency p50/p99;
4. idle: after ``idle_s`` without jobs, send one -> first-job-after-idle
   latency (``idle_samples`` times; the median is reported).

Worker CPU per job is the CPU time (user + system, every thread, and the
children of a worker that forks, such as RQ's pool) the worker process tree
used while draining, divided by the jobs it started meanwhile: from the first
start record seen to the last one. The same figure is taken over the steady
phase, where a worker's idle polling between jobs counts too.
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

    jobs: int = 3_000
    drain_rounds: int = 3
    rate_hz: float = 200.0
    steady_s: float = 10.0
    idle_s: float = 5.0
    idle_samples: int = 5
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
    cpu_us_per_job_drain: float | None = None
    cpu_us_per_job_steady: float | None = None
    drain_rounds: list[float] = field(default_factory=list)  # drain jobs/s of each round
    cpu_rounds: list[float] = field(default_factory=list)  # worker CPU us/job of each round
    idle_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stalled: bool = False  # its worker started no job at all (see WorkerStalled)

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

    def count(self) -> int:
        """Records that arrived so far (not taken)."""
        return cast(int, self._client.llen(self._key))

    def wait_for_count(self, expected: int, timeout_s: float,
                       proc: subprocess.Popen[bytes] | None = None) -> int:
        """Wait until at least ``expected`` records arrived (they stay); the count then.

        With ``proc``, stop waiting as soon as that worker has exited: no record
        can come any more, and waiting out the timeout only hides the crash.
        """
        deadline = time.monotonic() + timeout_s
        n = self.count()
        while n < expected and time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                n = self.count()  # what it recorded before it exited
                break
            time.sleep(COLLECT_POLL_S)
            n = self.count()
        return n

    def wait_for(self, expected: int, timeout_s: float, since: float = 0.0) -> list[tuple[float, float]]:
        """Wait until ``expected`` records of jobs enqueued at/after ``since`` arrived, then take them."""
        deadline = time.monotonic() + timeout_s
        while cast(int, self._client.llen(self._key)) < expected and time.monotonic() < deadline:
            time.sleep(COLLECT_POLL_S)
        raw = cast(list[bytes], self._client.lrange(self._key, 0, -1))
        self._client.delete(self._key)
        pairs = [tuple(map(float, item.split())) for item in raw]
        return [(enq, start) for enq, start in pairs if enq >= since]


_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user + system clock ticks) of every process (Linux /proc)."""
    out: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        # The command name is in parentheses and may hold spaces: fields start after ")".
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of ``pid`` and its live descendants."""
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in stats.items():
        children.setdefault(parent, []).append(child)
    ticks, todo = 0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            ticks += stats[current][1]
        todo.extend(children.get(current, ()))
    return ticks / _CLOCK_TICKS_PER_S


def start_worker(peer: Peer, env: BenchEnv, log_path: Path,
                 cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m bench.worker <peer>`` in its own session (its pool children too).

    ``cwd`` is where it runs, hence which ``bench`` and ``runtime`` it imports
    (``bench.compare`` runs another revision's runtime this way).
    """
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "bench.worker", peer.key],
        env={**os.environ, **env_vars(env)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, cwd=cwd,
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
             log_dir: Path, worker_cwd: Path | None = None) -> PeerResult:
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
    log_path = log_dir / f"worker-{peer.key}.log"
    try:
        enqueue_rates: list[float] = []
        for round_no in range(max(1, cfg.drain_rounds)):
            if proc is not None:
                _stop(out, proc)
            enqueue_rates += _enqueue_rates(producer, cfg.jobs)
            started_at = time.time()
            proc = start_worker(peer, env, log_path, worker_cwd)
            _drain(out, records, cfg, started_at, proc, log_path, first_round=round_no == 0)
        out.enqueue_per_s = statistics.median(enqueue_rates)
        _summarise_drains(out)
        assert proc is not None
        _steady(out, producer, records, cfg, proc.pid)
        _idle(out, producer, records, cfg)
    except Exception as exc:  # noqa: BLE001 - a peer that breaks loses its row, not the run
        out.stalled = isinstance(exc, WorkerStalled)
        out.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        if proc is not None:
            _stop(out, proc)
        producer.close()
    return out


def _stop(out: PeerResult, proc: subprocess.Popen[bytes]) -> None:
    stop_worker(proc)
    if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL, 1):
        out.problems.append(f"worker exited with {proc.returncode}")


def _enqueue_rates(producer: Producer, jobs: int) -> list[float]:
    """Rates of ENQUEUE_CHUNKS equal chunks; their median moves less with one stall of a
    shared machine than the rate of the whole."""
    size = max(1, jobs // ENQUEUE_CHUNKS)
    rates = []
    for done in range(0, jobs, size):
        count = min(size, jobs - done)
        rates.append(count / producer.send_many(count, None))
    return rates


def _summarise_drains(out: PeerResult) -> None:
    """The median round's drain rate and CPU per job (each median on its own)."""
    if out.drain_rounds:
        out.drain_per_s = statistics.median(out.drain_rounds)
    if out.cpu_rounds:
        out.cpu_us_per_job_drain = statistics.median(out.cpu_rounds)


def _log_tail(path: Path, lines: int = 3) -> str:
    """The last ``lines`` lines of a worker log, on one line (the log may be in a temporary
    directory that is gone when the report is read)."""
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError as exc:
        return f"(unreadable: {exc})"
    return " | ".join(tail) or "(empty)"


class WorkerStalled(RuntimeError):
    """The worker started no job at all: it crashed, or cannot read the jobs sent.

    The peer's remaining phases would each wait out their timeouts for nothing
    (``bench.compare`` against a revision with another job format did exactly
    that), so ``run_peer`` stops the peer here and notes why.
    """


def _drain(out: PeerResult, records: Records, cfg: JobsConfig, started_at: float,
           proc: subprocess.Popen[bytes], log_path: Path, first_round: bool) -> None:
    # CPU from the first start seen (the worker has booted: imports are not counted) to the last.
    first = records.wait_for_count(1, cfg.drain_timeout_s, proc)
    if first == 0:
        state = (f"exited with {proc.returncode}" if proc.poll() is not None
                 else f"started none within {cfg.drain_timeout_s:.0f} s")
        raise WorkerStalled(f"no job started: the worker {state}; the end of its log "
                            f"{log_path}: {_log_tail(log_path)}")
    cpu_before_s = tree_cpu_s(proc.pid)
    last = records.wait_for_count(cfg.jobs, cfg.drain_timeout_s, proc)
    cpu_after_s = tree_cpu_s(proc.pid)
    if last > first:
        out.cpu_rounds.append((cpu_after_s - cpu_before_s) / (last - first) * 1e6)
    got = records.wait_for(cfg.jobs, 1.0)
    if len(got) < cfg.jobs:
        out.problems.append(f"drain: {len(got)} of {cfg.jobs} jobs started within {cfg.drain_timeout_s}s")
    if len(got) < 2:
        return
    starts = sorted(start for _, start in got)
    if first_round:
        out.startup_s = starts[0] - started_at
    out.drain_rounds.append((len(starts) - 1) / max(starts[-1] - starts[0], 1e-9))


def _steady(out: PeerResult, producer: Producer, records: Records, cfg: JobsConfig,
            pid: int) -> None:
    count = int(cfg.rate_hz * cfg.steady_s)
    since = time.time()
    cpu_before_s = tree_cpu_s(pid)
    elapsed_s = producer.send_many(count, cfg.rate_hz)
    out.steady_sent_per_s = count / elapsed_s
    records.wait_for_count(count, cfg.steady_s + 30.0)
    out.cpu_us_per_job_steady = (tree_cpu_s(pid) - cpu_before_s) / count * 1e6
    got = records.wait_for(count, 1.0, since)
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
