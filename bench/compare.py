"""``python -m bench.compare --before REV``: another revision's runtime worker against this one, in one run.

On a shared machine two runs of ``bench.run`` minutes apart differ by more
than most optimisations do, so a before/after claim needs both in the same
run. This takes ``runtime/`` of the git revision ``REV`` (``git archive``,
into a temporary directory beside this checkout's ``bench/``), then runs the
no-op phases of ``bench.run`` for raw Dramatiq, the runtime worker of ``REV``
and the runtime worker of this checkout, alternated ``--reps`` times on one
throw-away Redis, and prints each figure per repetition and the medians.
Only the worker process runs the other revision; the producer is this
checkout's. Prints only (BENCHMARKS.md is not touched).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import redis

from bench.harness import SLOTS, BenchEnv, Peer
from bench.jobs_bench import QUEUE, JobsConfig, PeerResult, run_peer
from bench.peers import RawDramatiq, RuntimeJobs, RuntimeJobsActorHop
from bench.run import _db_url, throwaway_redis

REPO = Path(__file__).resolve().parent.parent


def export_revision(rev: str, into: Path) -> None:
    """``bench/`` of this checkout and ``runtime/`` of ``rev``, under ``into``."""
    for tree, rev_of_tree in (("bench", "HEAD"), ("runtime", rev)):
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev_of_tree, tree],
                                 check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
    # This checkout's bench/ may have changes not committed yet: use the files as they are.
    for path in (REPO / "bench").glob("*.py"):
        (into / "bench" / path.name).write_text(path.read_text())


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f}" if values else "n/a"


def _line(rep: int, name: str, r: PeerResult) -> str:
    if not r.drain_rounds and r.problems:  # nothing measured: the problem is the whole line
        return f"  rep {rep} {name:<16} PROBLEMS {'; '.join(r.problems)}"
    drains = ", ".join(f"{v:,.0f}" for v in r.drain_rounds)
    cpus = ", ".join(f"{v:,.0f}" for v in r.cpu_rounds)
    idle = ", ".join(f"{v:.1f}" for v in r.idle_ms)
    return (f"  rep {rep} {name:<16} drain {drains} jobs/s | CPU {cpus} µs/job | steady CPU "
            f"{r.cpu_us_per_job_steady or 0:,.0f} µs/job | p50 {r.p50_ms or 0:.2f} p99 "
            f"{r.p99_ms or 0:.2f} ms | idle {idle} ms"
            + (f" | PROBLEMS {'; '.join(r.problems)}" if r.problems else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision whose runtime/ is 'before'")
    p.add_argument("--reps", type=int, default=2, help="alternations of the three workers")
    p.add_argument("--actors", action="store_true", help="the pykka actor hop peer instead")
    p.add_argument("--jobs", type=int, default=JobsConfig.jobs)
    p.add_argument("--drain-rounds", type=int, default=JobsConfig.drain_rounds)
    p.add_argument("--steady-s", type=float, default=JobsConfig.steady_s)
    p.add_argument("--idle-samples", type=int, default=3)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = JobsConfig(jobs=args.jobs, drain_rounds=args.drain_rounds, steady_s=args.steady_s,
                     idle_samples=args.idle_samples)
    runtime_peer: Callable[[], Peer] = RuntimeJobsActorHop if args.actors else RuntimeJobs
    rows: dict[str, list[PeerResult]] = {}
    print(f"load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="shopflow-compare-") as tmp:
        root = Path(tmp)
        before_dir = root / "before"
        export_revision(args.before, before_dir)
        with throwaway_redis(root / "var") as (url, _port):
            results = redis.Redis.from_url(_db_url(url, 0))
            lineup: list[tuple[str, Peer, Path | None]] = [
                ("raw Dramatiq", RawDramatiq(), None),
                (f"before {args.before}", runtime_peer(), before_dir),
                ("after (this)", runtime_peer(), REPO),
            ]
            stalled: set[str] = set()
            for rep in range(args.reps):
                for db, (name, peer, cwd) in enumerate(lineup, start=1):
                    if name in stalled:
                        continue  # it started no job last time; it will not this time either
                    env = BenchEnv(redis_url=_db_url(url, db), results_url=_db_url(url, 0),
                                   results_key=f"bench:compare:{db}", queue=QUEUE, slots=SLOTS)
                    result = run_peer(peer, env, results, cfg, root, worker_cwd=cwd)
                    rows.setdefault(name, []).append(result)
                    print(_line(rep, name, result), flush=True)
                    if result.stalled:
                        stalled.add(name)
    print(f"load average at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("medians over every round and repetition:")
    for name, results_of in rows.items():
        print(f"  {name:<16} drain {_median([v for r in results_of for v in r.drain_rounds])} jobs/s"
              f" | CPU {_median([v for r in results_of for v in r.cpu_rounds])} µs/job"
              f" | steady CPU {_median([r.cpu_us_per_job_steady for r in results_of if r.cpu_us_per_job_steady])} µs/job"
              f" | p99 {_median([r.p99_ms for r in results_of if r.p99_ms is not None])} ms"
              f" | idle {_median([v for r in results_of for v in r.idle_ms])} ms")
    return 0 if all(not r.problems for rs in rows.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
