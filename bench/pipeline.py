"""``python -m bench.pipeline``: the order pipeline on the full CDNOW master file.

Runs ``shopflow up --once --data master`` exactly as a user would (embedded
Valkey and PostgreSQL, migrations, the demo shop, the whole process tree under
supervisord), in a temporary var dir on free ports so that it shares nothing
with anything else on the machine. Every order is created through the HTTP
API, reserved, paid and taken by the fulfilment flow to ready_to_ship. The
replay sends all orders as fast as it can (``--day-s 0``), so the pipeline
works from a backlog: its throughput is the ceiling of this process tree on
this machine.

Figures come from the database (order_status_history), via the replay's
``--summary-json``: orders per second from payment confirmed to
ready_to_ship (those orders over first payment to last ready_to_ship), the
paid -> ready_to_ship latency p50/p99, and created -> ready_to_ship. They are
written into BENCHMARKS.md between the pipeline markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import report
from bench.run import DEFAULT_OUTPUT, free_port
from runtime.settings import Settings

BEGIN = "<!-- bench:pipeline:begin (python -m bench.pipeline rewrites this block) -->"
END = "<!-- bench:pipeline:end -->"
# Stock scaled so that 69,659 orders do not sell the shop out (the point is speed).
DEFAULT_STOCK_MULTIPLIER = 100
# About 50 minutes at 23 orders/s on a shared 2-core machine; generous on purpose.
DEFAULT_TIMEOUT_S = 3 * 3600.0


def shopflow_bin() -> str:
    """The ``shopflow`` command of this interpreter's environment."""
    return str(Path(sys.executable).with_name("shopflow"))


def isolated_settings(var_dir: Path) -> Settings:
    """Settings of a tree of its own: own var dir, embedded servers and ports."""
    base = Settings.from_env({k: v for k, v in os.environ.items()
                              if k not in ("REDIS_URL", "DATABASE_URL")})
    return replace(base, var_dir=var_dir, http_port=free_port(), embedded_redis_port=free_port(),
                   embedded_pg_port=free_port(), warehouse_sim_port=free_port(),
                   carrier_sim_port=free_port())


def run_pipeline(args: argparse.Namespace, root: Path) -> tuple[int, dict[str, Any] | None]:
    """``shopflow up --once`` in ``root``; its exit status and the summary's JSON."""
    settings = isolated_settings(root / "var")
    summary_path = root / "summary.json"
    cmd = [shopflow_bin(), "up", "--once", "--data", "master", "--day-s", "0",
           "--stock-multiplier", str(args.stock_multiplier), "--timeout-s", str(args.timeout_s),
           "--summary-json", str(summary_path)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    print("[pipeline] " + shlex.join(cmd), flush=True)
    child = subprocess.Popen(cmd, env={**os.environ, **settings.to_env()})
    # Stopping the benchmark stops the tree: `up` cleans up on SIGTERM (a background
    # run ignores SIGINT), and the temporary directory is only removed after it has.
    previous = signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.terminate()
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return code, summary


def _ms(value: float) -> str:
    return f"{value / 1000:,.1f} s" if value >= 10_000 else f"{value:,.0f} ms"


def render(m: report.Machine, command: str, s: dict[str, Any], elapsed_s: float) -> str:
    """The generated block: what ran, on what, and the figures."""
    load = ", ".join(f"{v:.2f}" for v in m.load_at_start)
    pipe = s["pipeline"]
    outcomes = ", ".join(f"{n:,} {status}" for status, n in sorted(s["by_status"].items()))
    failures = "; ".join(f"{n:,} × {reason}" for reason, n in s["failures"].items()) or "none"
    return f"""{BEGIN}
Measured {m.when} with `{command}` (whole run {elapsed_s / 60:.1f} min), which runs
`shopflow up --once --data master --day-s 0` in a temporary var dir on free ports.

Machine: {m.cpus} CPUs ({m.cpu_model}), {m.memory_gib:.1f} GiB RAM, Linux {m.kernel},
Python {m.python}; load average at start {load} (the machine is shared). Default
process counts from supervisord.conf.

| | figure |
| --- | --- |
| orders | {s["orders"]:,} ({outcomes}) |
| failures | {failures} |
| confirmation e-mails | {s["emails"]:,} ({s["duplicate_emails"]} duplicates) |
| **payment confirmed → ready_to_ship** | **{pipe["throughput"]:.1f} orders/s** ({pipe["orders"]:,} orders over {pipe["span_s"]:,.0f} s) |
| latency paid → ready_to_ship p50 / p95 / p99 | {_ms(pipe["latency_ms"]["p50"])} / {_ms(pipe["latency_ms"]["p95"])} / {_ms(pipe["latency_ms"]["p99"])} |
| created → outcome, whole replay | {s["throughput"]:.1f} orders/s over {s["elapsed_s"]:,.0f} s |
| latency created → ready_to_ship p50 / p95 / p99 | {_ms(s["latency_ms"]["p50"])} / {_ms(s["latency_ms"]["p95"])} / {_ms(s["latency_ms"]["p99"])} |

Every order is sent at once (a backlog), so the latencies are mostly queueing
behind earlier orders; the throughput is the figure to compare.
{END}
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N orders of the master file (default: all 69,659)")
    p.add_argument("--stock-multiplier", type=int, default=DEFAULT_STOCK_MULTIPLIER,
                   help=f"scale the shop's stock (default {DEFAULT_STOCK_MULTIPLIER})")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help="give up waiting for outcomes after this long")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help="markdown file whose pipeline block is replaced (default BENCHMARKS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the replay; write BENCHMARKS.md; exit with the replay's status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = ("python -m bench.pipeline " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    machine = report.machine_details()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shopflow-pipeline-") as tmp:
        code, summary = run_pipeline(args, Path(tmp))
    if summary is None:
        print(f"[pipeline] the replay wrote no summary (exit status {code})", file=sys.stderr)
        return code or 1
    text = render(machine, command, summary, time.monotonic() - began)
    print(text)
    if not args.no_write:
        report.write_block(args.output, text, BEGIN, END)
        print(f"written to {args.output}")
    return code


if __name__ == "__main__":
    sys.exit(main())
