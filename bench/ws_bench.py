"""WebSocket fan-out benchmark (not a test): the notifier vs a minimal aiohttp broadcast loop.

N clients subscribe to stock-updated; the bench XADDs R events per second for D
seconds to the channel's Redis Stream (the outbox relay's format), each
carrying its send time; clients record delivery latency. Both servers run in
their own process against the same embedded Redis, one after the other in the
same run, and their resident memory is sampled while they work.

    python bench/ws_bench.py                       # 1,000 clients, 1,000 ev/s, 30 s
    python bench/ws_bench.py --clients 200 --rate 100 --duration 10

Prints a Markdown table (copied into docs/web.md) and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-only-secret-0123456789abcdef"
CHANNEL = "stock-updated"
DRAIN_S = 5.0  # after publishing stops, how long clients keep listening
BUCKET_MS = 1  # latency histogram resolution
MAX_BUCKET = 120_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- servers (run as subprocesses) ----------------------------------------------------


def serve(kind: str, port: int, redis_url: str, namespace: str) -> None:
    """Run one server until killed."""
    from aiohttp import web

    _raise_fd_limit()
    app = _shopflow_app(redis_url, namespace) if kind == "shopflow" else _baseline_app(
        redis_url, namespace)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _shopflow_app(redis_url: str, namespace: str) -> Any:
    from aiohttp import web

    from runtime.settings import Settings
    from web.realtime import setup_realtime

    settings = replace(Settings.from_env({}), redis_url=redis_url, database_url="unused",
                       namespace=namespace, token_secret=SECRET)
    app = web.Application()
    setup_realtime(app, settings)
    return app


def _baseline_app(redis_url: str, namespace: str) -> Any:
    """The minimal broadcast loop: one XREAD task, a set of sockets, send to each in turn."""
    import redis.asyncio as aioredis
    from aiohttp import web
    from redis.exceptions import ConnectionError as RedisConnectionError

    clients: set[web.WebSocketResponse] = set()

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        clients.add(ws)
        try:
            async for _ in ws:
                pass
        finally:
            clients.discard(ws)
        return ws

    async def broadcast(app: web.Application) -> Any:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        key = f"{namespace}:events:{CHANNEL}"

        async def loop() -> None:
            last = "$"
            while True:
                try:
                    reply = await client.xread({key: last}, block=1000, count=500)
                except RedisConnectionError:
                    return  # Redis stopped at the end of the run (the baseline does not resume)
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        text = json.dumps({"type": "event", "id": entry_id,
                                           "payload": json.loads(fields["payload"])})
                        for ws in list(clients):
                            try:
                                await ws.send_str(text)
                            except (ConnectionError, RuntimeError):
                                clients.discard(ws)

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        await client.aclose()

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.cleanup_ctx.append(broadcast)
    return app


# --- clients (run as subprocesses) -----------------------------------------------------


async def clients_main(url: str, n: int, listen_s: float, out: str) -> None:
    """Open ``n`` connections, subscribe, record latencies, dump a histogram."""
    import aiohttp

    _raise_fd_limit()
    histogram = [0] * (MAX_BUCKET + 1)
    received = 0
    closes: dict[str, int] = {}
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                    connector=aiohttp.TCPConnector(limit=0))
    sockets = []
    for _ in range(n):
        ws = await session.ws_connect(url, max_msg_size=0, heartbeat=None)
        await ws.send_str(json.dumps({"type": "subscribe", "channel": CHANNEL}))
        sockets.append(ws)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent says go
    deadline = time.monotonic() + listen_s

    async def reader(ws: Any) -> None:
        nonlocal received
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                msg = await ws.receive(timeout=left)
            except TimeoutError:
                return
            if msg.type != aiohttp.WSMsgType.TEXT:
                code = str(ws.close_code)
                closes[code] = closes.get(code, 0) + 1
                return
            text = msg.data
            at = text.find('"t_ns":')
            if at < 0:
                continue
            end = text.find("}", at)
            sent_ns = int(text[at + 7:end].strip().rstrip(","))
            latency_ms = (time.time_ns() - sent_ns) // 1_000_000
            histogram[min(max(latency_ms, 0) // BUCKET_MS, MAX_BUCKET)] += 1
            received += 1

    await asyncio.gather(*(reader(ws) for ws in sockets))
    Path(out).write_text(json.dumps({"received": received, "histogram": histogram,
                                     "closes": closes}))
    print("done", flush=True)
    for ws in sockets:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 1.0)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(session.close(), 2.0)


# --- the run ------------------------------------------------------------------------------


def _rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _percentile(histogram: list[int], fraction: float) -> float | None:
    total = sum(histogram)
    if total == 0:
        return None
    target, seen = total * fraction, 0
    for bucket, count in enumerate(histogram):
        seen += count
        if seen >= target:
            return float(bucket * BUCKET_MS)
    return float(MAX_BUCKET)


async def _publish(redis_url: str, namespace: str, rate: int, duration_s: float) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    key = f"{namespace}:events:{CHANNEL}"
    tick_s, sent = 0.01, 0
    per_tick = max(1, round(rate * tick_s))
    start = time.monotonic()
    while time.monotonic() - start < duration_s:
        due = int((time.monotonic() - start) * rate)
        pipe = client.pipeline(transaction=False)
        batch = 0
        while sent + batch < due and batch < per_tick * 10:
            payload = {"product_id": (sent + batch) % 500, "quantity": 7,
                       "reserved_quantity": 1, "t_ns": time.time_ns()}
            pipe.xadd(key, {"id": str(sent + batch), "type": "stock.updated",
                            "payload": json.dumps(payload), "correlation_id": "",
                            "at": ""}, maxlen=20_000, approximate=True)
            batch += 1
        if batch:
            await pipe.execute()
            sent += batch
        await asyncio.sleep(tick_s)
    await client.aclose()
    return sent


def run_one(kind: str, args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    """Start a server of ``kind``, connect the clients, publish, collect."""
    namespace = f"bench{kind}{os.getpid()}"
    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, "serve", "--kind", kind, "--port",
                               str(port), "--redis-url", redis_url, "--namespace", namespace],
                              cwd=ROOT)
    try:
        _wait_port(port)
        url = f"ws://127.0.0.1:{port}/ws"
        if kind == "shopflow":
            from web.auth import TokenSigner

            url += "?token=" + TokenSigner(SECRET.encode()).issue("staff", None, 3600)
        outs, procs = [], []
        per_proc = args.clients // args.client_procs
        listen_s = args.duration + DRAIN_S
        for i in range(args.client_procs):
            out = tempfile.mktemp(suffix=".json")
            outs.append(out)
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "clients", "--url", url, "--n", str(per_proc),
                 "--listen-s", str(listen_s), "--out", out],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT))
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        idle_rss, _ = _rss_kib(server.pid)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        samples: list[int] = []

        async def publish_and_sample() -> int:
            task = asyncio.create_task(_publish(redis_url, namespace, args.rate, args.duration))
            while not task.done():
                samples.append(_rss_kib(server.pid)[0])
                await asyncio.sleep(0.5)
            return await task

        sent = asyncio.run(publish_and_sample())
        for proc in procs:  # "done" once results are written; do not wait for its teardown
            assert proc.stdout is not None
            proc.stdout.readline()
            proc.kill()
            proc.wait()
        _, peak_rss = _rss_kib(server.pid)
        histogram = [0] * (MAX_BUCKET + 1)
        received, closes = 0, {}
        for out in outs:
            data = json.loads(Path(out).read_text())
            received += data["received"]
            histogram = [a + b for a, b in zip(histogram, data["histogram"])]
            for code, count in data["closes"].items():
                closes[code] = closes.get(code, 0) + count
            os.unlink(out)
        expected = sent * per_proc * args.client_procs
        return {"server": kind, "clients": per_proc * args.client_procs, "sent": sent,
                "expected_deliveries": expected, "delivered": received,
                "delivered_pct": round(100 * received / expected, 1) if expected else 0,
                "p50_ms": _percentile(histogram, 0.5), "p99_ms": _percentile(histogram, 0.99),
                "closed_by_server": closes, "idle_rss_mib": round(idle_rss / 1024, 1),
                "max_rss_mib": round(max(samples + [idle_rss]) / 1024, 1),
                "peak_rss_mib": round(peak_rss / 1024, 1)}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode")
    s = sub.add_parser("serve")
    s.add_argument("--kind", choices=["shopflow", "baseline"], required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--redis-url", required=True)
    s.add_argument("--namespace", required=True)
    c = sub.add_parser("clients")
    c.add_argument("--url", required=True)
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--listen-s", type=float, required=True)
    c.add_argument("--out", required=True)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=1000, help="events per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of publishing")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--redis-url", default=None, help="default: a private embedded Redis")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.kind, args.port, args.redis_url, args.namespace)
        return
    if args.mode == "clients":
        asyncio.run(clients_main(args.url, args.n, args.listen_s, args.out))
        return
    _raise_fd_limit()
    from runtime import embedded

    var = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    paths, port = embedded.EmbeddedPaths(var), _free_port()
    redis_url = args.redis_url or embedded.ensure_redis(paths, port)
    try:
        results = [run_one(kind, args, redis_url) for kind in ("shopflow", "baseline")]
    finally:
        if args.redis_url is None:
            embedded.stop_redis(paths, port)
            embedded.remove_data(paths)
    load = os.getloadavg()
    print(f"\n{args.clients} clients, {args.rate} events/s for {args.duration:.0f} s; "
          f"{os.cpu_count()} cores, load average {load[0]:.1f}\n")
    print("| server | delivered | p50 latency | p99 latency | closed by server | "
          "RSS idle → max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['server']} | {r['delivered']:,} of {r['expected_deliveries']:,} "
              f"({r['delivered_pct']}%) | {r['p50_ms']} ms | {r['p99_ms']} ms | "
              f"{r['closed_by_server'] or 'none'} | {r['idle_rss_mib']} → "
              f"{r['max_rss_mib']} MiB |")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"ws_bench_{int(time.time())}.json"
    out.write_text(json.dumps({"args": vars(args), "load": load, "results": results}, indent=2))
    print(f"\nwritten to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
