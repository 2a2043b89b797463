"""Measure a /metrics scrape after many real jobs and several worker restarts.

    python -m ops.bench.metrics_scrape [--jobs 10000] [--restarts 5]

Starts the embedded Redis (or uses REDIS_URL), runs real Dramatiq worker
processes with the metrics middleware one after another (every other one is
SIGKILLed, the rest stop cleanly), sends the jobs spread over 8 queues and 24
actors (2% fail for good), then times the scrape that adds up every process's
files. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import dramatiq

from runtime import embedded
from runtime.broker import ALL_QUEUES, JobSpec, declare_actor, setup_broker
from runtime.errors import PermanentJobError
from runtime.metrics import metrics_dir, prepare_metrics_dir, render_metrics
from runtime.metrics_middleware import MetricsMiddleware
from runtime.settings import Settings

ACTORS_PER_QUEUE = 3
SPECS = [JobSpec(q, f"bench_{q}_{i}") for q in ALL_QUEUES for i in range(ACTORS_PER_QUEUE)]


def job(n: int) -> None:
    """Succeeds, except every 50th job fails for good."""
    if n % 50 == 0:
        raise PermanentJobError(f"job {n} fails on purpose")


def run_worker(settings: Settings) -> int:
    """Worker mode: serve every bench actor until stdin closes."""
    broker = setup_broker(settings, [MetricsMiddleware(settings)])
    for spec in SPECS:
        declare_actor(broker, spec, job)
    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=50)
    worker.start()
    print("ready", flush=True)
    sys.stdin.read()
    worker.stop()
    broker.close()
    return 0


def _jobs_done(settings: Settings) -> float:
    body, _ = render_metrics(settings)
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith("shopflow_jobs_total{"))


def run_bench(settings: Settings, jobs: int, restarts: int) -> dict[str, object]:
    prepare_metrics_dir(settings)
    producer = setup_broker(settings)
    env = {**os.environ, **settings.to_env()}
    per_round = jobs // (restarts + 1)
    sent = 0
    started_s = time.perf_counter()
    for round_no in range(restarts + 1):
        proc = subprocess.Popen([sys.executable, "-m", "ops.bench.metrics_scrape", "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        count = per_round if round_no < restarts else jobs - sent
        for n in range(count):
            SPECS[(sent + n) % len(SPECS)].send(producer, sent + n)
        sent += count
        while _jobs_done(settings) < sent:
            time.sleep(0.2)
        if round_no % 2 == 0:
            proc.kill()
        else:
            proc.stdin.close()
        proc.wait(60)
    work_s = time.perf_counter() - started_s
    timings_s = []
    for _ in range(20):
        t0 = time.perf_counter()
        body, _ = render_metrics(settings)
        timings_s.append(time.perf_counter() - t0)
    producer.close()
    files = list(metrics_dir(settings).glob("*.db"))
    return {
        "jobs": sent, "worker_processes": restarts + 1, "jobs_counted": _jobs_done(settings),
        "work_s": round(work_s, 1), "metric_files": len(files),
        "metric_files_bytes": sum(f.stat().st_size for f in files),
        "scrape_body_bytes": len(body), "series": body.count(b"\n") - body.count(b"\n#"),
        "scrape_median_ms": round(statistics.median(timings_s) * 1000, 1),
        "scrape_max_ms": round(max(timings_s) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings.from_env()
    if args.worker:
        return run_worker(settings)
    settings = replace(embedded.ensure_services(settings), namespace=f"bench{os.getpid()}")
    print(json.dumps(run_bench(settings, args.jobs, args.restarts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
