"""``python -m bench.run``: the whole benchmark in one run, on one throw-away Redis.

Starts an embedded valkey-server (runtime.embedded.ensure_redis) on a free
port in a temporary var dir, runs the no-op job phases for every peer in
turn, redis-benchmark against the same server (the ceiling), then stock
reservation under contention on an embedded PostgreSQL; prints a table with
ratios against raw Dramatiq and writes the results into BENCHMARKS.md.
Everything it started is stopped and its var dir deleted at the end.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from bench import ceiling, report, reservations
from bench.harness import SLOTS, BenchEnv
from bench.jobs_bench import QUEUE, JobsConfig, PeerResult, run_peer
from bench.peers import PEERS
from runtime import embedded

RESULTS_DB = 0  # peers get databases 1..n; the start records and redis-benchmark use 0
DEFAULT_OUTPUT = Path("BENCHMARKS.md")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def throwaway_redis(root: Path) -> Iterator[tuple[str, int]]:
    """An embedded valkey-server on a free port with its data under ``root``; stopped after."""
    paths = embedded.EmbeddedPaths(root)
    port = free_port()
    url = embedded.ensure_redis(paths, port)
    try:
        yield url, port
    finally:
        embedded.stop_redis(paths, port)


def _db_url(base_url: str, db: int) -> str:
    return f"{base_url.rsplit('/', 1)[0]}/{db}"


def run_peers(redis_url: str, cfg: JobsConfig, only: set[str] | None, log_dir: Path) -> list[PeerResult]:
    """Every selected peer in turn, each on its own Redis database of the same server."""
    results_url = _db_url(redis_url, RESULTS_DB)
    results_client = redis.Redis.from_url(results_url)
    out: list[PeerResult] = []
    for index, peer in enumerate(PEERS, start=1):
        if only and peer.key not in only:
            continue
        env = BenchEnv(redis_url=_db_url(redis_url, index), results_url=results_url,
                       results_key=f"bench:starts:{peer.key}", queue=QUEUE, slots=SLOTS)
        print(f"[peers] {peer.name} ...", flush=True)
        started = time.monotonic()
        result = run_peer(peer, env, results_client, cfg, log_dir)
        print(f"[peers] {peer.name}: {report.peer_line(result)} ({time.monotonic() - started:.0f} s)",
              flush=True)
        out.append(result)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=JobsConfig.jobs,
                   help="jobs for the enqueue/drain phases, per round")
    p.add_argument("--drain-rounds", type=int, default=JobsConfig.drain_rounds,
                   help="enqueue + drain rounds per peer, a fresh worker each (median reported)")
    p.add_argument("--rate", type=float, default=JobsConfig.rate_hz, help="steady rate, jobs/s")
    p.add_argument("--steady-s", type=float, default=JobsConfig.steady_s, help="steady phase length")
    p.add_argument("--idle-s", type=float, default=JobsConfig.idle_s, help="idle time before the lone job")
    p.add_argument("--idle-samples", type=int, default=JobsConfig.idle_samples)
    p.add_argument("--only", default="", help="comma-separated peer keys (default: all)")
    p.add_argument("--orders", type=int, default=reservations.DEFAULT_ORDERS)
    p.add_argument("--products", type=int, default=reservations.DEFAULT_PRODUCTS)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: peers,ceiling,reservations")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help="markdown file whose generated block is replaced (default BENCHMARKS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run everything; write BENCHMARKS.md; exit 0 if every part ran and invariants held."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    skip = {s for s in args.skip.split(",") if s}
    only = {s for s in args.only.split(",") if s} or None
    cfg = JobsConfig(jobs=args.jobs, drain_rounds=args.drain_rounds, rate_hz=args.rate,
                     steady_s=args.steady_s, idle_s=args.idle_s, idle_samples=args.idle_samples)
    command = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine = report.machine_details()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shopflow-bench-") as tmp:
        root = Path(tmp)
        with throwaway_redis(root / "var") as (redis_url, port):
            server = report.server_version(redis_url)
            peers = [] if "peers" in skip else run_peers(redis_url, cfg, only, root)
            ceil = None if "ceiling" in skip else ceiling.run(port)
        res = None if "reservations" in skip else reservations.run(root / "pg", args.orders, args.products)
        if peers:
            print(report.worker_log_tails(root, peers), end="")
    elapsed_s = time.monotonic() - began
    text = report.render(machine, server, command.strip(), cfg, peers, ceil, res, elapsed_s)
    print(text)
    if not args.no_write:
        report.write_block(args.output, text)
        print(f"written to {args.output}")
    ok = all(not p.problems for p in peers if not p.skipped) and (res is None or res.all_invariants_held)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
