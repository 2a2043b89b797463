"""Measure ``GET /metrics`` on a real ``shopflow web`` after many real jobs and restarts.

    python -m ops.bench.metrics_scrape [--jobs 10000] [--restarts 5] [--scrapes 20]

Starts the embedded Redis and PostgreSQL (or uses REDIS_URL / DATABASE_URL),
starts ``shopflow web`` (the api: it serves /metrics, adding up every
process's files) on a free port, runs real Dramatiq worker processes (the
runtime's job broker and metrics middleware) one after another (every other
one is SIGKILLed, the rest stop cleanly), sends the jobs spread over 8 queues
and 24 actors (2% fail for good), checks that the api's /metrics counts every
job, then times ``--scrapes`` HTTP GETs of /metrics, as Prometheus does.
Prints one JSON line. This is the figure in BENCHMARKS.md ("Metrics scrape");
tests/runtime/test_metrics.py checks the values, not the time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

from runtime import embedded
from runtime.broker import ALL_QUEUES, JobSpec, declare_actor, setup_broker
from runtime.errors import PermanentJobError
from runtime.jobs.worker import make_worker
from runtime.metrics import metrics_dir, prepare_metrics_dir
from runtime.metrics_middleware import MetricsMiddleware
from runtime.settings import Settings

# How long the api may take to start listening, and one scrape to answer.
API_START_S = 120.0
SCRAPE_TIMEOUT_S = 30.0

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
    worker = make_worker(broker, None, 4)
    worker.start()
    print("ready", flush=True)
    sys.stdin.read()
    worker.stop()
    broker.close()
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_metrics(port: int) -> bytes:
    """One ``GET /metrics`` on the api, as Prometheus sends it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=SCRAPE_TIMEOUT_S) as resp:
        body: bytes = resp.read()
        return body


def _jobs_done(port: int) -> float:
    body = _get_metrics(port)
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith("shopflow_jobs_total{"))


def start_api(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    """``shopflow web`` on ``port``, once it answers /metrics."""
    env = {**os.environ, **replace(settings, http_port=port).to_env()}
    log = (settings.var_dir / "bench-api.log").open("ab")
    api = subprocess.Popen([shutil.which("shopflow") or "shopflow", "web"], env=env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + API_START_S
    while True:
        try:
            _get_metrics(port)
            return api
        except OSError:
            if api.poll() is not None or time.monotonic() > deadline:
                api.kill()
                raise SystemExit(f"shopflow web did not start; see {log.name}") from None
            time.sleep(0.2)


def run_bench(settings: Settings, jobs: int, restarts: int, scrapes: int) -> dict[str, object]:
    prepare_metrics_dir(settings)
    port = _free_port()
    api = start_api(settings, port)
    producer = setup_broker(settings)
    env = {**os.environ, **settings.to_env()}
    per_round = jobs // (restarts + 1)
    sent = 0
    started_s = time.perf_counter()
    try:
        for round_no in range(restarts + 1):
            proc = subprocess.Popen([sys.executable, "-m", "ops.bench.metrics_scrape",
                                     "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    env=env, text=True)
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "ready"
            count = per_round if round_no < restarts else jobs - sent
            for n in range(count):
                SPECS[(sent + n) % len(SPECS)].send(producer, sent + n)
            sent += count
            while _jobs_done(port) < sent:
                time.sleep(0.2)
            if round_no % 2 == 0:
                proc.kill()
            else:
                proc.stdin.close()
            proc.wait(60)
        work_s = time.perf_counter() - started_s
        timings_s = []
        for _ in range(scrapes):
            t0 = time.perf_counter()
            body = _get_metrics(port)
            timings_s.append(time.perf_counter() - t0)
        counted = _jobs_done(port)
    finally:
        producer.close()
        api.send_signal(signal.SIGTERM)
        try:
            api.wait(30)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait(10)
    files = list(metrics_dir(settings).glob("*.db"))
    return {
        "jobs": sent, "worker_processes": restarts + 1, "jobs_counted": counted,
        "work_s": round(work_s, 1), "metric_files": len(files),
        "metric_files_bytes": sum(f.stat().st_size for f in files),
        "scrape_body_bytes": len(body), "series": body.count(b"\n") - body.count(b"\n#"),
        "scrapes": scrapes,
        "scrape_median_ms": round(statistics.median(timings_s) * 1000, 1),
        "scrape_max_ms": round(max(timings_s) * 1000, 1),
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings.from_env()
    if args.worker:
        return run_worker(settings)
    with embedded.running_services(settings) as resolved:  # stops what it started
        bench = replace(resolved, namespace=f"bench{os.getpid()}")
        print(json.dumps(run_bench(bench, args.jobs, args.restarts, args.scrapes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
