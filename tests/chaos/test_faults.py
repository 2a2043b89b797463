"""Chaos: real orders flow through the supervised process tree while one thing breaks.

Each test starts its own Redis and PostgreSQL (so it may restart them), the
repository's supervisord.conf with the real programs, the outside services
(warehouse and carrier simulators, a SendGrid server checking the v3 mail send
contract) on ports of its own, and replays real CDNOW orders through the HTTP
API: every order is packed by the warehouse, labelled by the carrier and
confirmed by e-mail through the official SendGrid SDK. Mid-run it injects one fault, then checks that
after recovery every order has exactly one outcome, no e-mail went out twice,
the inventory invariants hold, no order was packed or labelled twice, no job is
dead or lost, and every program is RUNNING again. Time to recover is printed and appended to
``var/chaos-recovery.jsonl`` of the test (see BENCHMARKS.md).

Run alone with ``ops/dev test -m chaos``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from supervisor.xmlrpc import SupervisorTransport

from actors.demo.catalog import load_orders, seed
from actors.demo.replay import Replay, Summary
from actors.demo.up import start_supervisord, stop_supervisord, wait_healthy
from actors.emailer.sendgrid_transport import IDEMPOTENCY_ARG
from ops.simulators.carrier import CARRIER_KEY, create_carrier_app
from ops.simulators.faults import FAULTS_KEY
from ops.simulators.warehouse import WAREHOUSE_KEY, create_warehouse_app
from runtime import db, embedded
from runtime.broker import ALL_QUEUES
from runtime.settings import Settings
from tests.actors.agents.fake_anthropic import FakeAnthropic, hang
from tests.actors.sendgrid.fake_sendgrid import API_KEY, create_fake_sendgrid
from tests.chaos.conftest import failed
from tests.support import free_port, wait_until
from web.auth import signer_from_settings

pytestmark = pytest.mark.chaos

ORDERS = 200
DAY_S = 1.0  # the first 200 orders span 8 days of data: about 8 s of steady load
OUTAGE_S = 6.0  # how long an outside service stays down or hung


class Externals:
    """The outside services of the tree, served from one event loop in a thread of the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.warehouse = create_warehouse_app()
        self.carrier = create_carrier_app()
        self.sendgrid_app, self.sendgrid = create_fake_sendgrid()
        self.ports = {"warehouse": free_port(), "carrier": free_port(), "sendgrid": free_port()}
        self._runners: list[web.AppRunner] = []
        self.anthropic: FakeAnthropic | None = None
        self.anthropic_url = ""

    def call(self, coro: Any) -> Any:
        """Run ``coro`` on the services' loop (their state is only touched there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> None:
        self.thread.start()
        apps = {"warehouse": self.warehouse, "carrier": self.carrier, "sendgrid": self.sendgrid_app}
        for name, app in apps.items():
            self.call(self._serve(app, self.ports[name]))

        async def start_anthropic() -> None:
            self.anthropic = FakeAnthropic()  # its events belong to this loop
            self.anthropic_url = await self.anthropic.start()
        self.call(start_anthropic())

    async def _serve(self, app: web.Application, port: int) -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self._runners.append(runner)

    def stop(self) -> None:
        if self.anthropic is not None:
            self.call(self.anthropic.close())
        for runner in self._runners:
            self.call(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def set_faults(self, app: web.Application, **knobs: float) -> None:
        async def change() -> None:
            state = app[FAULTS_KEY]
            state.faults = state.faults.updated(knobs)
        self.call(change())

    def anthropic_hangs(self, hanging: bool) -> None:
        async def change() -> None:
            assert self.anthropic is not None
            self.anthropic.default = hang() if hanging else None
        self.call(change())

    def script_sendgrid(self, steps: list[Any]) -> None:
        async def change() -> None:
            self.sendgrid.script.extend(steps)
        self.call(change())

    def sendgrid_script_left(self) -> int:
        async def read() -> int:
            return len(self.sendgrid.script)
        return int(self.call(read()))

    def accepted_keys(self) -> list[str]:
        """The idempotency key of every e-mail SendGrid accepted, repeats included."""
        async def read() -> list[str]:
            return [a.body.get("custom_args", {}).get(IDEMPOTENCY_ARG, "")
                    for a in self.sendgrid.accepted]
        return list(self.call(read()))

    def orders_done_by(self, name: str) -> list[int]:
        """The order of every packing request (warehouse) or label (carrier) made, repeats included."""
        async def read() -> list[int]:
            if name == "warehouse":
                return [int(r["order_id"]) for r in self.warehouse[WAREHOUSE_KEY].packing.values()]
            return [int(r["order_id"]) for r in self.carrier[CARRIER_KEY].labels.values()]
        return list(self.call(read()))


@dataclass
class Tree:
    """A running process tree on servers this test owns."""

    settings: Settings
    paths: embedded.EmbeddedPaths
    supervisord: subprocess.Popen[bytes]
    externals: Externals

    def rpc(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.settings.var_dir}/supervisor.sock")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def pid_of(self, program: str) -> int:
        return int(self.rpc().getProcessInfo(program)["pid"])

    def all_running(self) -> bool:
        return all(p["statename"] == "RUNNING" for p in self.rpc().getAllProcessInfo())

    def restart_redis(self) -> None:
        embedded.stop_redis(self.paths, self.settings.embedded_redis_port)
        embedded.ensure_redis(self.paths, self.settings.embedded_redis_port)

    def restart_postgres(self) -> None:
        embedded.stop_postgres(self.paths)
        embedded.ensure_postgres(self.paths, self.settings.embedded_pg_port)

    def hang_warehouse(self) -> None:
        """Every warehouse request (packing, stock lookup) hangs for a while, then it answers again."""
        app = self.externals.warehouse
        self.externals.set_faults(app, hang_rate=1.0)
        time.sleep(OUTAGE_S)  # the length of the outage, while the load keeps coming
        self.externals.set_faults(app, hang_rate=0.0)

    def fail_carrier(self) -> None:
        """The carrier answers 503 to every label request for a while."""
        app = self.externals.carrier
        self.externals.set_faults(app, error_rate=1.0, error_status=503)
        time.sleep(OUTAGE_S)  # the length of the outage, while the load keeps coming
        self.externals.set_faults(app, error_rate=0.0)

    def fail_sendgrid(self) -> None:
        """SendGrid fails every way it can: 5xx, 429 with Retry-After, hangs, and a
        hang after accepting the e-mail (the case that sends it twice elsewhere)."""
        steps: list[Any] = [500, 503, (429, 1), "hang", "accept_hang", 502, "accept_hang", "hang", 500, 503]
        self.externals.script_sendgrid(steps * 2)
        wait_until(lambda: self.externals.sendgrid_script_left() == 0, 120,
                   "every scripted SendGrid failure to be served")

    def hang_anthropic(self) -> None:
        """The model API hangs: recommendations asked over HTTP meanwhile still answer, from
        the fallback, within the LLM timeout, and the orders keep flowing."""
        self.externals.anthropic_hangs(True)
        customers = asyncio.run(_some_customers(self.settings, 3))
        token = signer_from_settings(self.settings).issue("staff", None, 600)
        for customer_id in customers:
            asked = time.monotonic()
            answer = _get_json(self.settings, f"/api/v1/customers/{customer_id}/recommendations", token)
            assert answer["source"] == "fallback", answer
            assert time.monotonic() - asked < self.settings.llm_timeout_s + 5
        self.externals.anthropic_hangs(False)


async def _some_customers(settings: Settings, n: int) -> list[int]:
    conn = await db.connect(settings.database_url or "")
    try:
        return [int(r["id"]) for r in await conn.fetch("SELECT id FROM customers ORDER BY id LIMIT $1", n)]
    finally:
        await conn.close()


def _get_json(settings: Settings, path: str, token: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{settings.http_port}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


async def _prepare(settings: Settings) -> None:
    conn = await db.connect(settings.database_url or "")
    try:
        await db.migrate(conn)
        await seed(conn, load_orders(limit=ORDERS))
    finally:
        await conn.close()


def _dump_outside_record(externals: Externals, var: Path) -> None:
    """What the outside services saw, next to the logs of a failed test."""
    async def read() -> dict[str, Any]:
        fake = externals.sendgrid
        return {
            "sendgrid_requests": [r["body"].get("custom_args", {}) for r in fake.requests],
            "sendgrid_accepted": [a.body.get("custom_args", {}) for a in fake.accepted],
            "sendgrid_script_left": list(map(str, fake.script)),
        }
    (var / "outside-record.json").write_text(json.dumps(externals.call(read()), indent=1))


@pytest.fixture
def tree(request: pytest.FixtureRequest) -> Iterator[Tree]:
    var = Path(tempfile.mkdtemp(prefix="shopflow-chaos-"))
    externals = Externals()
    externals.start()
    base = Settings.from_env({"SHOPFLOW_VAR_DIR": str(var)})
    settings = replace(
        base, embedded_redis_port=free_port(), embedded_pg_port=free_port(), http_port=free_port(),
        warehouse_sim_port=free_port(), api_processes=2, email_workers=1, job_backoff_ms=200,
        broker_heartbeat_timeout_ms=3_000, broker_maintenance_chance=200_000, outbox_poll_s=0.2,
        namespace="chaos",
        warehouse_url=externals.url("warehouse"), carrier_url=externals.url("carrier"),
        external_read_timeout_s=1.0, external_backoff_s=0.2, breaker_reset_s=1.0,
        sendgrid_api_key=API_KEY, sendgrid_host=externals.url("sendgrid"), sendgrid_timeout_s=1.0,
        sendgrid_reconcile_grace_s=2.0,
        anthropic_api_key="sk-ant-chaos", anthropic_base_url=externals.anthropic_url,
        llm_timeout_s=1.0, llm_max_retries=0,
    )
    paths = embedded.EmbeddedPaths(var)
    settings = embedded.ensure_services(settings)
    asyncio.run(_prepare(settings))
    proc = start_supervisord(settings)
    t = Tree(settings, paths, proc, externals)
    try:
        wait_healthy(settings, proc)
        yield t
    finally:
        stop_supervisord(proc)
        keep = failed(request.node)
        if keep:
            _dump_outside_record(externals, var)
        externals.stop()
        embedded.stop_redis(paths, settings.embedded_redis_port)
        embedded.stop_postgres(paths)
        if keep:
            print(f"\nchaos: kept {var} (logs under log/, data of Redis and PostgreSQL)")
        else:
            embedded.remove_data(paths)


class Load:
    """The replay running in a thread, with a way to see progress from the test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.summary: Summary | None = None
        self.error: BaseException | None = None
        self.replay: Replay | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.summary = asyncio.run(self._replay())
        except BaseException as exc:  # noqa: BLE001 -- handed to the test thread, which re-raises it
            self.error = exc

    async def _replay(self) -> Summary:
        import redis.asyncio as aioredis

        pool = await db.create_pool(self.settings.database_url or "", min_size=1, max_size=3)
        client = aioredis.Redis.from_url(self.settings.redis_url or "")
        try:
            self.replay = Replay(f"http://127.0.0.1:{self.settings.http_port}", pool, client,
                                 self.settings.namespace, load_orders(limit=ORDERS), DAY_S,
                                 timeout_s=240, progress_to=None)
            return await self.replay.run()
        finally:
            await client.aclose()
            await pool.close()

    def done_count(self) -> int:
        return len(self.replay.state.done) if self.replay else 0

    def finish(self) -> Summary:
        self.thread.join(300)
        if self.error:
            raise self.error
        assert self.summary is not None
        return self.summary


async def _check_outcomes(settings: Settings) -> None:
    conn = await db.connect(settings.database_url or "")
    try:
        assert await conn.fetchval("SELECT count(*) FROM orders") == ORDERS
        assert await conn.fetchval(
            "SELECT count(*) FROM orders WHERE status NOT IN ('ready_to_ship', 'failed')") == 0
        assert await conn.fetchval(
            """SELECT count(*) FROM (SELECT order_id FROM order_status_history
                WHERE to_status IN ('ready_to_ship', 'failed') GROUP BY order_id HAVING count(*) <> 1) x""") == 0
        assert await conn.fetchval(
            "SELECT count(*) FROM (SELECT order_id FROM email_log GROUP BY order_id HAVING count(*) > 1) x") == 0
        assert await conn.fetchval(
            """SELECT count(*) FROM inventory i WHERE i.reserved_quantity <>
               coalesce((SELECT sum(quantity) FROM inventory_reservations r WHERE r.product_id = i.product_id), 0)""") == 0
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    finally:
        await conn.close()


def _emails_settled(settings: Settings) -> bool:
    """Every shipped order's e-mail is recorded as sent (an outage can delay that, not skip it)."""
    async def q() -> bool:
        conn = await db.connect(settings.database_url or "")
        try:
            sent = await conn.fetchval("SELECT count(*) FROM email_log WHERE status = 'sent'")
            shipped = await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'ready_to_ship'")
            return bool(sent == shipped)
        finally:
            await conn.close()
    return asyncio.run(q())


async def _shipped(settings: Settings) -> list[int]:
    conn = await db.connect(settings.database_url or "")
    try:
        rows = await conn.fetch("SELECT id FROM orders WHERE status = 'ready_to_ship' ORDER BY id")
        return [int(r["id"]) for r in rows]
    finally:
        await conn.close()


def _check_outside_effects(tree: Tree) -> None:
    """One packing request, one label and one confirmation e-mail per shipped order, none twice."""
    shipped = asyncio.run(_shipped(tree.settings))
    for service in ("warehouse", "carrier"):
        orders = tree.externals.orders_done_by(service)
        assert len(orders) == len(set(orders)), f"{service}: an order was done twice"
        assert sorted(orders) == shipped, f"{service}: not every shipped order, or more"
    keys = tree.externals.accepted_keys()
    assert len(keys) == len(set(keys)), "SendGrid accepted an e-mail twice"
    assert len(keys) == len(shipped)


def _no_dead_jobs(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    ns = f"{settings.namespace}-jobs"
    dead = {q: client.zcard(f"{ns}:{q}.XQ") for q in ALL_QUEUES}
    assert sum(dead.values()) == 0, dead


def _record(settings: Settings, fault: str, recover_s: float) -> None:
    line = json.dumps({"fault": fault, "recover_s": round(recover_s, 2)})
    print(f"\nchaos: {line}")
    with (settings.var_dir / "chaos-recovery.jsonl").open("a") as fh:
        fh.write(line + "\n")
    out = os.environ.get("SHOPFLOW_CHAOS_REPORT")
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")


def _kill(program: str) -> Callable[[Tree], None]:
    def fault(tree: Tree) -> None:
        os.kill(tree.pid_of(program), signal.SIGKILL)
    return fault


FAULTS: dict[str, Callable[[Tree], None]] = {
    "sigkill api-0": _kill("api:api-0"),
    "sigkill email-worker": _kill("email-worker:email-worker-0"),
    "sigkill inventory-worker": _kill("inventory-worker"),
    "sigkill flow-worker": _kill("flow-worker"),
    "sigkill agents-worker": _kill("agents-worker"),
    "sigkill scheduler": _kill("scheduler:scheduler-0"),
    "sigkill stock-sync": _kill("stock-sync"),
    "redis restart": Tree.restart_redis,
    "postgresql restart": Tree.restart_postgres,
    "warehouse hangs": Tree.hang_warehouse,
    "carrier fails": Tree.fail_carrier,
    "sendgrid fails and hangs": Tree.fail_sendgrid,
    "anthropic hangs": Tree.hang_anthropic,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_orders_survive(tree: Tree, fault: str) -> None:
    load = Load(tree.settings)
    load.thread.start()
    wait_until(lambda: load.done_count() >= 20 or not load.thread.is_alive(), 120, "steady load")
    assert load.thread.is_alive(), "the load ended before the fault"
    FAULTS[fault](tree)  # returns when the fault is over (outside services: after the outage)
    over = time.monotonic()
    before = load.done_count()
    wait_until(lambda: load.done_count() > before or not load.thread.is_alive(), 120,
               "the first order completed after the fault")
    recover_s = time.monotonic() - over
    summary = load.finish()
    assert summary.complete, summary.render()
    asyncio.run(_check_outcomes(tree.settings))
    wait_until(lambda: _emails_settled(tree.settings), 120, "every confirmation e-mail recorded as sent",
               every_s=0.5)
    _check_outside_effects(tree)
    _no_dead_jobs(tree.settings)
    wait_until(tree.all_running, 60, "every program RUNNING again")
    _record(tree.settings, fault, recover_s)
