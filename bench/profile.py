"""``python -m bench.profile``: where the runtime's worker spends its time, against raw Dramatiq.

For each peer (default: raw Dramatiq and the two runtime adapters), on a
throw-away Redis: fill the queue with a backlog, start the peer's worker,
and let ``py-spy record --gil`` sample it while it drains (only the thread
holding the GIL is sampled, which is what limits a threaded Python worker).
Prints, per peer, the functions with the largest share of samples, inclusive
and self, and the producer side profiled in-process with cProfile. The
folded stacks are left in ``--out`` (default ``bench/results/``, not committed)
for a flame graph.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis

from bench.harness import SLOTS, BenchEnv
from bench.jobs_bench import QUEUE, Records, start_worker, stop_worker
from bench.peers import peer_by_key
from bench.run import _db_url, throwaway_redis

TOP = 22


def py_spy() -> str | None:
    """The py-spy executable: on the PATH, or next to this interpreter (an unactivated venv)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def _frame_name(frame: str) -> str:
    """``fn (path/to/module.py:123)`` -> ``fn (module.py)``: per function, not per line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})"


def summarize(folded: Path) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, inclusive counts, self counts) per function from py-spy's raw output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")[1:]]  # the first is the thread
        if not frames:
            continue
        total += count
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    return total, inclusive, own


def _table(title: str, counts: Counter[str], total: int) -> str:
    lines = [f"  {title}:"]
    for name, n in counts.most_common(TOP):
        lines.append(f"    {n / total * 100:5.1f} %  {name}")
    return "\n".join(lines)


def profile_worker(key: str, redis_url: str, results_url: str, jobs: int, duration_s: float,
                   out_dir: Path) -> str:
    peer = peer_by_key(key)
    env = BenchEnv(redis_url=redis_url, results_url=results_url, results_key=f"bench:starts:{key}",
                   queue=QUEUE, slots=SLOTS)
    redis.Redis.from_url(redis_url).flushdb()
    records = Records(redis.Redis.from_url(results_url), env.results_key)
    records.reset()
    producer = peer.open_producer(env)
    producer.send_many(jobs, None)
    proc = start_worker(peer, env, out_dir / f"worker-{key}.log")
    folded = out_dir / f"profile-{key}.folded"
    try:
        records.wait_for(1, 30.0)  # the worker is consuming
        subprocess.run([py_spy() or "py-spy", "record", "--pid", str(proc.pid), "--gil", "--rate", "250",
                        "--duration", str(int(duration_s)), "--format", "raw", "-o", str(folded)],
                       check=True, capture_output=True)
        done = records.wait_for(jobs, 120.0)
    finally:
        stop_worker(proc)
        producer.close()
    total, inclusive, own = summarize(folded)
    return (f"{peer.name}: {total} samples holding the GIL in {duration_s:.0f} s of draining "
            f"({len(done) + 1} of {jobs} jobs seen)\n"
            + _table("inclusive (share of GIL samples with the function on the stack)", inclusive, total)
            + "\n" + _table("self (leaf function)", own, total) + "\n")


def profile_producer(key: str, redis_url: str, results_url: str, jobs: int) -> str:
    peer = peer_by_key(key)
    env = BenchEnv(redis_url=redis_url, results_url=results_url, results_key="unused",
                   queue=QUEUE, slots=SLOTS)
    redis.Redis.from_url(redis_url).flushdb()
    producer = peer.open_producer(env)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    producer.send_many(jobs, None)
    profiler.disable()
    elapsed_s = time.perf_counter() - started
    producer.close()
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(12)
    body = "\n".join(line for line in buf.getvalue().splitlines() if line.strip())
    return f"{peer.name} producer: {jobs / elapsed_s:,.0f} jobs/s under cProfile\n{body}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--peers", default="dramatiq,runtime,runtime-actors")
    p.add_argument("--jobs", type=int, default=15_000, help="backlog the worker drains while sampled")
    p.add_argument("--duration-s", type=float, default=6.0)
    p.add_argument("--producer-jobs", type=int, default=3_000)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if py_spy() is None:
        print("py-spy not found: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with (tempfile.TemporaryDirectory(prefix="shopflow-profile-") as tmp,
          throwaway_redis(Path(tmp)) as (url, _port)):
        results_url = _db_url(url, 0)
        for index, key in enumerate(args.peers.split(","), start=1):
            peer_url = _db_url(url, index)
            print(profile_worker(key, peer_url, results_url, args.jobs, args.duration_s, args.out),
                  flush=True)
            print(profile_producer(key, peer_url, results_url, args.producer_jobs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
