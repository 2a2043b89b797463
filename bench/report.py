"""Machine details, the result tables, and the generated block of BENCHMARKS.md."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import redis

from bench.ceiling import CLIENTS, TESTS, CeilingResult
from bench.harness import SLOTS
from bench.jobs_bench import JobsConfig, PeerResult
from bench.peers import BASELINE_KEY, PEERS
from bench.reservations import INVARIANTS, ReservationsResult

BEGIN = "<!-- bench:generated:begin (python -m bench.run rewrites this block) -->"
END = "<!-- bench:generated:end -->"


@dataclass(frozen=True)
class Machine:
    when: str
    cpus: int
    cpu_model: str
    memory_gib: float
    python: str
    load_at_start: tuple[float, float, float]
    kernel: str


def machine_details() -> Machine:
    """What the figures were measured on (read before anything starts)."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    mem_kib = 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        found = re.search(r"^MemTotal:\s*(\d+) kB", meminfo.read_text(), re.MULTILINE)
        mem_kib = int(found.group(1)) if found else 0
    return Machine(
        when=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cpus=len(os.sched_getaffinity(0)), cpu_model=model, memory_gib=mem_kib / 2**20,
        python=platform.python_version(), load_at_start=os.getloadavg(),
        kernel=platform.release(),
    )


def server_version(redis_url: str) -> str:
    info = cast(dict[str, Any], redis.Redis.from_url(redis_url).info("server"))
    return f"valkey {info.get('valkey_version') or info.get('redis_version')}"


def _f(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    ratio = value / base
    return f" ({ratio:.2f}x)" if ratio >= 0.1 else f" ({ratio:.3f}x)"


def peer_line(r: PeerResult) -> str:
    """One line of progress output for a peer."""
    if r.skipped:
        return f"skipped: {r.skipped}"
    text = (f"enqueue {_f(r.enqueue_per_s)}/s, drain {_f(r.drain_per_s)}/s, "
            f"p50 {_f(r.p50_ms, '{:.1f}')} ms, p99 {_f(r.p99_ms, '{:.1f}')} ms, "
            f"idle {_f(r.idle_median_ms, '{:.1f}')} ms, "
            f"CPU {_f(r.cpu_us_per_job_drain)} us/job drain, {_f(r.cpu_us_per_job_steady)} @ steady")
    return text + (f" PROBLEMS: {'; '.join(r.problems)}" if r.problems else "")


def _versions(keys: tuple[str, ...]) -> str:
    out = []
    for dist in keys:
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def peers_table(peers: list[PeerResult], ceil: CeilingResult | None) -> str:
    base = next((p for p in peers if p.key == BASELINE_KEY and not p.skipped), None)
    lpush_1 = ceil.rps.get(("LPUSH", 1)) if ceil else None
    rows = [
        ("| peer | enqueue jobs/s | drain jobs/s | worker CPU µs/job, drain | CPU µs/job @ steady "
         "| latency p50 ms @ steady | p99 ms | first job after idle, ms (median) "
         "| enqueue vs LPUSH -c 1 |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in peers:
        if p.skipped:
            rows.append(f"| {p.name} | skipped: {p.skipped} | | | | | | | |")
            continue
        b = base
        rows.append(
            f"| {p.name} | {_f(p.enqueue_per_s)}{_ratio(p.enqueue_per_s, b.enqueue_per_s if b else None)} "
            f"| {_f(p.drain_per_s)}{_ratio(p.drain_per_s, b.drain_per_s if b else None)} "
            f"| {_f(p.cpu_us_per_job_drain)}"
            f"{_ratio(p.cpu_us_per_job_drain, b.cpu_us_per_job_drain if b else None)} "
            f"| {_f(p.cpu_us_per_job_steady)}"
            f"{_ratio(p.cpu_us_per_job_steady, b.cpu_us_per_job_steady if b else None)} "
            f"| {_f(p.p50_ms, '{:.1f}')}{_ratio(p.p50_ms, b.p50_ms if b else None)} "
            f"| {_f(p.p99_ms, '{:.1f}')}{_ratio(p.p99_ms, b.p99_ms if b else None)} "
            f"| {_f(p.idle_median_ms, '{:.1f}')}{_ratio(p.idle_median_ms, b.idle_median_ms if b else None)} "
            f"| {_f(p.enqueue_per_s / lpush_1 * 100 if p.enqueue_per_s and lpush_1 else None, '{:.0f} %')} |"
        )
    return "\n".join(rows)


def _peer_details(peers: list[PeerResult]) -> str:
    by_key = {p.key: p for p in PEERS}
    lines = []
    for r in peers:
        peer = by_key[r.key]
        extra = ""
        if not r.skipped:
            idle = ", ".join(f"{v:.1f}" for v in r.idle_ms)
            drains = ", ".join(f"{v:,.0f}" for v in r.drain_rounds)
            cpus = ", ".join(f"{v:,.0f}" for v in r.cpu_rounds)
            extra = (f" Worker start-up to first job {_f(r.startup_s, '{:.1f}')} s; drain rounds "
                     f"{drains} jobs/s, CPU {cpus} µs/job; steady phase sent "
                     f"{_f(r.steady_sent_per_s, '{:.0f}')} jobs/s; idle samples {idle} ms.")
        if r.problems:
            extra += f" **Problems:** {'; '.join(r.problems)}."
        lines.append(f"- **{r.name}** ({_versions(peer.distributions)}): {r.setup}.{extra}")
    return "\n".join(lines)


def ceiling_table(ceil: CeilingResult | None) -> str:
    if ceil is None:
        return "Not run (`--skip ceiling`)."
    if ceil.skipped:
        return f"Skipped: {ceil.skipped}."
    head = "| command | " + " | ".join(f"-c {c} requests/s" for c in CLIENTS) + " |"
    rows = [head, "| --- |" + " ---: |" * len(CLIENTS)]
    for t in TESTS:
        rows.append(f"| {t} | " + " | ".join(_f(ceil.rps.get((t, c))) for c in CLIENTS) + " |")
    return f"{ceil.version}, `-n 50000`, no pipelining, same server as the peers.\n\n" + "\n".join(rows)


def reservations_table(res: ReservationsResult | None) -> str:
    if res is None:
        return "Not run (`--skip reservations`)."
    rows = [
        (f"{res.orders:,} orders over {res.products} hot products ({res.stock_per_product:,} units each, "
        f"demand about 1.4x the stock), PostgreSQL {res.server} (embedded, fsync on), "
        "each order reserved by `actors.inventory.reservations.reserve_for_order` (one transaction, "
        "rows locked in product order, outbox events written)."),
        "",
        "| concurrent reservers | orders/s | ratio to 1 | reserved | failed (shortage) | invariants |",
        "| ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base = res.levels[0].per_s if res.levels else None
    for lv in res.levels:
        held = "held" if lv.invariants_held else "BROKEN: " + ", ".join(
            f"{k} ({v})" for k, v in lv.violations.items() if v)
        rows.append(f"| {lv.reservers} | {lv.per_s:,.0f} | {_ratio(lv.per_s, base).strip(' ()')} "
                    f"| {lv.reserved:,} | {lv.failed:,} | {held} |")
    rows += ["", ("Invariants checked in SQL after each level (each query counts violating rows; "
             "all were 0 where it says held):"), ""]
    rows += [f"- {name}" for name in INVARIANTS]
    return "\n".join(rows)


def render(m: Machine, server: str, command: str, cfg: JobsConfig, peers: list[PeerResult],
           ceil: CeilingResult | None, res: ReservationsResult | None, elapsed_s: float) -> str:
    """The generated block: machine, command, and the three measured sections."""
    load = ", ".join(f"{v:.2f}" for v in m.load_at_start)
    return f"""{BEGIN}
Measured {m.when} with `{command}` (whole run {elapsed_s / 60:.1f} min).

Machine: {m.cpus} CPUs ({m.cpu_model}), {m.memory_gib:.1f} GiB RAM, Linux {m.kernel},
Python {m.python}, {server} (embedded, started by the run on a free port, AOF everysec).
Load average at start: {load}. **The machine is shared** (several engineers run
tests and servers on the same {m.cpus} CPUs), so absolute figures are noisy; the
ratios within one run are the meaningful part, and even they move a lot
between runs (enqueue and p99 columns by up to 2-3x; compare the rounds
listed under each peer, and "The job layer's goals" below).

## Peers: no-op jobs

One worker process with {SLOTS} threads/slots per peer (RQ: {SLOTS} processes, it has no
threads), all on the same Redis server (each peer its own database), one at a
time. The job body is the same function for all (`bench/body.py`: take
`time.time()`, append to a buffer). Enqueue: {cfg.jobs:,} jobs sent one by one from one
thread with no worker running (median rate of 5 equal chunks per round). Drain: a fresh
worker then starts on that backlog (jobs started per second from first to last start);
enqueue and drain are done {cfg.drain_rounds} times per peer and the median round is shown
(every round is listed below the table). Worker CPU per job: user + system CPU
time of the worker process (all threads; RQ: the pool and its children, from /proc) while
it drains, divided by the jobs started meanwhile; "@ steady" is the same over the steady
phase, idle polling between jobs included. Latency: enqueue-to-start at
a steady {cfg.rate_hz:.0f} jobs/s for {cfg.steady_s:.0f} s. First job after idle: the worker idle
{cfg.idle_s:.0f} s, then one job ({cfg.idle_samples} samples). Ratios in brackets are against raw
Dramatiq (for CPU and latencies lower is better).

{peers_table(peers, ceil)}

How each peer was set up:

{_peer_details(peers)}

## Stock reservation under contention

{reservations_table(res)}

## Ceiling

{ceiling_table(ceil)}
{END}
"""


def write_block(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block of ``path`` between ``begin`` and ``end`` (``block`` carries both
    markers), or append it (to a new file: after a title)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def worker_log_tails(root: Path, peers: list[PeerResult]) -> str:
    """The end of the worker logs of peers that had problems (for the console)."""
    out = []
    for p in peers:
        log = root / f"worker-{p.key}.log"
        if p.problems and log.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            out.append(f"--- worker log of {p.name} (last lines) ---\n{tail}\n")
    return "".join(out)
