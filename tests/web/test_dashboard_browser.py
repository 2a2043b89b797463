"""The dashboard in real headless Chromium (Debian's package driven by Playwright).

Skipped cleanly when Chromium or Playwright is absent; `apt-get install -y chromium`
and the test extras (`pip install -e '.[test]'`) bring both (docs/web.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from runtime import db
from runtime.alerts import Alert, Alerter, Severity
from runtime.settings import Settings
from tests.web.conftest import Publisher, ServerFactory, build_full_app, seed
from web import seams
from web.auth import TokenSigner

CHROMIUM = os.environ.get("SHOPFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed"),
]
WAIT_MS = 10_000
# The channels the page subscribes to (web/static/dashboard.js CHANNELS).
DASHBOARD_CHANNELS = ["queues", "alerts", "order-status-changed", "stock-updated", "reviews",
                      "supervision"]


async def change_data(settings: Settings, sql: str) -> None:
    """Change the shop's data behind the page's back (what a stock sync would do)."""
    conn = await db.connect(settings.database_url or "")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def flag_review(settings: Settings, body: str, status: str, reason: str,
                      categories: list[str]) -> int:
    """A review and the moderation result that held or rejected it, as the agent stores them."""
    conn = await db.connect(settings.database_url or "")
    try:
        async with conn.transaction():
            review_id: int = await conn.fetchval(
                "INSERT INTO reviews (customer_id, product_id, rating, body, status) "
                "VALUES (1, 2, 1, $1, $2) RETURNING id", body, status)
            await conn.execute(
                "INSERT INTO moderation_log (review_id, status, source, approved, confidence, "
                "categories, reason) VALUES ($1, $2, 'model', false, 0.91, $3, $4)",
                review_id, status, categories, reason)
    finally:
        await conn.close()
    return review_id


@pytest.fixture
async def dashboard(web_settings: Settings, signer: TokenSigner,
                    start_server: ServerFactory) -> TestServer:
    await seed(web_settings)
    return await start_server(build_full_app(web_settings, signer))


def order_event(order_id: int) -> dict[str, object]:
    return {"order_id": order_id, "customer_id": 1, "from_status": "pending",
            "to_status": "reserved"}


async def test_dashboard_live_in_chromium(dashboard: TestServer, signer: TokenSigner,
                                          publish: Publisher, tmp_path: Path,
                                          web_settings: Settings,
                                          redis: aioredis.Redis) -> None:
    base = str(dashboard.make_url("/"))
    problems: list[str] = []
    subscribes: list[dict[str, str]] = []
    resubscribed = asyncio.Event()
    stock_fetches: list[str] = []

    def on_frame_sent(payload: str | bytes) -> None:
        message = json.loads(payload)
        if message.get("type") == "subscribe":
            subscribes.append(message)
            if len(subscribes) == 2 * len(DASHBOARD_CHANNELS):
                resubscribed.set()

    async def order_published_while_loading(route: Any) -> None:
        """The start state's order feed is computed, then an order changes, then it arrives:
        the page must still show that order (it subscribed before it loaded)."""
        response = await route.fetch()
        if not during_load:
            during_load.append(await publish("order-status-changed", order_event(50),
                                             event_type="order.status_changed"))
        await route.fulfill(response=response)

    during_load: list[str] = []
    rejected = await flag_review(web_settings, "You are all idiots, buy at spam.example",
                                 "rejected", "Insults and advertises.",
                                 ["personal_attack", "spam_or_promotion"])
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("websocket", lambda ws: ws.on("framesent", on_frame_sent))
            page.on("request", lambda r: stock_fetches.append(r.url)
                    if "/api/v1/stock-sync" in r.url else None)
            await page.route("**/api/v1/events/order-status-changed*",
                             order_published_while_loading)
            # The schedules' periodic refetch, short enough to see here (30 s by default).
            await page.add_init_script("window.shopflowScheduleRefreshMs = 300")
            await page.goto(base)
            await page.fill("#token", signer.issue("staff", None, 3600))
            await page.click("#login button[type=submit]")
            await page.wait_for_function(
                "document.querySelector('#live').textContent === 'live'", timeout=WAIT_MS)
            await page.wait_for_selector("tr[data-queue=emails]", timeout=WAIT_MS)
            assert await page.text_content("tr[data-queue=emails] td:nth-child(2)") == "3"
            # The order that changed while the start state loaded is there, once.
            await page.wait_for_function(
                "document.querySelector('#order-count').textContent === '1'", timeout=WAIT_MS)
            assert during_load and "order 50 " in (await page.text_content("#orders") or "")

            # A reconnect resumes every channel from its position, even the quiet ones: the
            # positions come from the subscribed replies, not only from events seen.
            await page.evaluate("state.ws.close()")
            await asyncio.wait_for(resubscribed.wait(), WAIT_MS / 1000)
            again = subscribes[len(DASHBOARD_CHANNELS):]
            assert sorted(m["channel"] for m in again) == sorted(DASHBOARD_CHANNELS)
            assert all(m.get("since") for m in again), again
            await page.wait_for_function(
                "document.querySelector('#live').textContent === 'live'", timeout=WAIT_MS)

            # Live counts move when events arrive over the WebSocket.
            await publish("queues", {"queue": "emails", "pending": 7, "failed": 2, "dead": 0,
                                     "delayed": 0, "processed_per_min": 30.5})
            await page.wait_for_function(
                "document.querySelector('tr[data-queue=emails] td:nth-child(2)')"
                ".textContent === '7'", timeout=WAIT_MS)
            for n in range(3):
                if n == 2:  # another kind of order event (a transition's extra job): not a row
                    await publish("order-status-changed", {"order_id": 101},
                                  event_type="order.job")
                await publish("order-status-changed", order_event(100 + n),
                              event_type="order.status_changed")
            await page.wait_for_selector("#orders li:has-text('order 102 ')", timeout=WAIT_MS)
            assert await page.text_content("#order-count") == "4"
            orders = await page.locator("#orders li").all_text_contents()
            assert len(orders) == 4 and not any("undefined" in t for t in orders), orders

            # A burst of stock events refetches the stock sync card a few times, not per event.
            await page.wait_for_selector("#stock-sync dd", timeout=WAIT_MS)
            fetched_before = len(stock_fetches)
            await change_data(web_settings, "UPDATE inventory SET synced_at = now() "
                                                  "WHERE product_id = 2")
            for n in range(20):
                last_stock = await publish("stock-updated", {"product_id": 2, "quantity": n})
            await page.wait_for_function(f"state.lastIds['stock-updated'] === '{last_stock}'",
                                         timeout=WAIT_MS)
            await page.wait_for_function(
                "document.querySelectorAll('#stock-sync dd')[2].textContent === '1'",
                timeout=WAIT_MS)  # never synced: 2 -> 1, fetched after the burst
            assert 1 <= len(stock_fetches) - fetched_before < 20
            await publish("alerts", {"severity": "critical", "message": "emails queue stuck"})
            await page.wait_for_selector("#alerts li:has-text('emails queue stuck')",
                                         timeout=WAIT_MS)
            # What the Alerter itself writes (labels/annotations), firing then resolved.
            alerter = Alerter(web_settings, redis)
            backlog = Alert("QueueBacklog", Severity.WARNING, "1,234 jobs wait in emails",
                            labels={"queue": "emails"})
            assert await alerter.fire(backlog)
            fired = "warning: QueueBacklog — 1,234 jobs wait in emails"
            await page.wait_for_selector(f"#alerts li:has-text('{fired}')", timeout=WAIT_MS)
            assert await alerter.resolve(backlog)
            await page.wait_for_selector(
                "#alerts li:has-text('resolved: QueueBacklog — 1,234 jobs wait in emails')",
                timeout=WAIT_MS)
            texts = await page.locator("#alerts li").all_text_contents()
            assert not any("undefined" in t for t in texts), texts

            # Restart counts follow the supervision channel; next runs the periodic refetch.
            restarts = "document.querySelector('#tree li[data-node=notifier] > .pill')"
            assert await page.evaluate(f"{restarts}.textContent") == "2 restarts"
            dashboard.app[seams.SUPERVISION].restarts = 3  # type: ignore[attr-defined]
            await publish("supervision", {"kind": "restart", "child": "notifier",
                                          "supervisor": "api"},
                          event_type="supervision.restart")
            await page.wait_for_function(f"{restarts}.textContent === '3 restarts'",
                                         timeout=WAIT_MS)
            slot = "document.querySelector('#schedules li[data-schedule=release-expired-reservations]')"
            assert await page.evaluate(f"{slot}.dataset.next") == "2026-12-03T20:05:00+00:00"
            dashboard.app[seams.SCHEDULES].next_run_at = "2026-12-03T20:10:00+00:00"  # type: ignore[attr-defined]
            await page.wait_for_function(
                f"{slot}.dataset.next === '2026-12-03T20:10:00+00:00'", timeout=WAIT_MS)

            # Flagged reviews: the start state, then a moderation event refetches the list.
            row = f"#flagged tr[data-review='{rejected}']"
            await page.wait_for_selector(row, timeout=WAIT_MS)
            assert "Insults and advertises." in (await page.text_content(row) or "")
            assert "personal_attack, spam_or_promotion" in (await page.text_content(row) or "")
            held = await flag_review(web_settings, "Meh, write me at ana@example.com",
                                     "manual_review", "Low confidence.", ["personal_data"])
            await publish("reviews", {"review_id": held, "status": "manual_review",
                                      "source": "model", "categories": ["personal_data"]},
                          event_type="review-moderated")
            await page.wait_for_selector(f"#flagged tr[data-review='{held}']", timeout=WAIT_MS)
            assert await page.locator("#flagged tbody tr").count() == 2
            assert await page.is_hidden("#flagged-empty")

            # The retry button calls the jobs endpoint.
            admin = dashboard.app[seams.JOBS_ADMIN]
            await page.click("tr[data-job=job-1] button.retry")
            await asyncio.wait_for(admin.retried_event.wait(), WAIT_MS / 1000)  # type: ignore[attr-defined]
            assert admin.retried == ["job-1"]  # type: ignore[attr-defined]
            await page.wait_for_selector("tr[data-job=job-1]", state="detached",
                                         timeout=WAIT_MS)

            shot = tmp_path / "dashboard-laptop.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # The token survives a reload; the page fits a phone.
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.reload()
            await page.wait_for_function(
                "document.querySelector('#live').textContent === 'live'", timeout=WAIT_MS)
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"horizontal scroll on a phone: {width}px"
            phone = tmp_path / "dashboard-phone.png"
            await page.screenshot(path=str(phone), full_page=True)
            assert phone.stat().st_size > 5_000
            target = os.environ.get("SHOPFLOW_SCREENSHOT_DIR")
            if target:
                shutil.copy(shot, Path(target) / shot.name)
                shutil.copy(phone, Path(target) / phone.name)
        finally:
            await browser.close()
    assert problems == []


async def test_dashboard_on_the_real_job_layer(web_settings: Settings, signer: TokenSigner,
                                               start_server: ServerFactory) -> None:
    """Real jobs: counts move live as a worker runs them; Remove deletes a failed job from the
    job layer; Retry re-runs another."""
    import threading

    from runtime.broker import ALL_QUEUES, QUEUE_ANALYTICS, JobSpec, declare_actor, setup_broker
    from runtime.errors import PermanentJobError
    from runtime.jobs.feed import QueueFeed
    from runtime.jobs.store import JobStore
    from runtime.jobs.worker import make_worker
    from web.adapters import StoreJobsAdmin

    await seed(web_settings)
    broker = setup_broker(web_settings)
    client = aioredis.Redis.from_url(web_settings.redis_url or "")
    store = JobStore(client, broker.keys, ALL_QUEUES)
    app = build_full_app(web_settings, signer)
    app[seams.JOBS_ADMIN] = StoreJobsAdmin(store)
    server = await start_server(app)
    feed = asyncio.create_task(QueueFeed(store, client, web_settings.namespace, 0.2).run())
    broken, finished = [True], threading.Event()

    def export(n: int) -> None:
        if broken[0]:
            raise PermanentJobError("the report bucket is gone")
        finished.set()

    spec = JobSpec(QUEUE_ANALYTICS, "dash_export")
    declare_actor(broker, spec, export)
    worker = make_worker(broker, {QUEUE_ANALYTICS}, 1)
    worker.start()
    failed, doomed = spec.send(broker, 1), spec.send(broker, 2)
    problems: list[str] = []
    row = "tr[data-queue=analytics]"
    try:
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                await page.goto(str(server.make_url("/")))
                await page.fill("#token", signer.issue("staff", None, 3600))
                await page.click("#login button[type=submit]")
                await page.wait_for_selector(f"tr[data-job='{failed.job_id}']", timeout=WAIT_MS)
                # Remove, for real: the job is gone from the store, not just from the page.
                await page.wait_for_selector(f"tr[data-job='{doomed.job_id}']", timeout=WAIT_MS)
                assert (await store.get(doomed.job_id) or {}).get("state") == "failed"
                await page.click(f"tr[data-job='{doomed.job_id}'] button.remove")
                await page.wait_for_selector(f"tr[data-job='{doomed.job_id}']",
                                             state="detached", timeout=WAIT_MS)
                assert await store.get(doomed.job_id) is None
                assert await page.is_visible(f"tr[data-job='{failed.job_id}']")
                # Live: a paused queue fills up on screen, then drains when resumed.
                await store.pause(QUEUE_ANALYTICS)
                for n in range(5):
                    spec.send(broker, 10 + n)
                await page.wait_for_function(
                    f"document.querySelector('{row} td:nth-child(2)')?.textContent === '5'",
                    timeout=WAIT_MS)
                await store.resume(QUEUE_ANALYTICS)
                await page.wait_for_function(
                    f"document.querySelector('{row} td:nth-child(2)')?.textContent === '0'",
                    timeout=WAIT_MS)
                # Retry, for real: the job runs again and leaves the failed list.
                broken[0] = False
                await page.click(f"tr[data-job='{failed.job_id}'] button.retry")
                assert await asyncio.to_thread(finished.wait, WAIT_MS / 1000)
                await page.wait_for_selector(f"tr[data-job='{failed.job_id}']",
                                             state="detached", timeout=WAIT_MS)
                job = await store.get(failed.job_id)
                assert job is not None and job["state"] == "completed"
            finally:
                await browser.close()
    finally:
        feed.cancel()
        worker.stop()
        broker.close()
        await client.aclose()
    assert problems == []
