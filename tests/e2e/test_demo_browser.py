"""`emu demo` in a real browser: the tour as its users see it.

The whole product runs in-process (embedded broker, simulator, agents, server); a fault is
injected into a simulated unit and must show up on the engineer's open faults page without a
reload, having gone unit -> Modbus -> agent -> MQTT -> ingest -> fault engine -> dashboard.
The customer then approves the remote session the scripted tour requested. Screenshots of
the pages go to tests/artifacts/screens/.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, expect

from emu.demo import DemoRun, run_demo
from tests.support.browser import browser_context, needs_chromium, screenshots
from tests.support.waiting import wait_for

pytestmark = [needs_chromium, pytest.mark.integration]


async def log_in(page: Page, url: str, name: str, password: str) -> None:
    """Through the form."""
    await page.goto(f"{url}/login")
    await page.get_by_label("User name").fill(name)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Fleet")).to_be_visible()


async def test_the_demo_tour_in_a_browser(tmp_path: Path) -> None:
    stop = asyncio.Event()
    runs: list[DemoRun] = []
    up = asyncio.Event()

    def started(run: DemoRun) -> None:
        runs.append(run)
        up.set()

    demo = asyncio.create_task(run_demo(0, tmp_path / "demo", stop, fault_every_s=3600,
                                        poll_interval_s=0.5, started=started))
    try:
        await wait_for(up.wait(), 60, "the demo to come up")
        run = runs[0]
        url, pw = run.url, run.logins.passwords
        admin = {"Authorization": f"Bearer {run.logins.tokens['admin']}"}
        async with httpx.AsyncClient(base_url=url, headers=admin, timeout=10) as api:

            async def session_requested() -> list[dict[str, object]] | None:
                r = await api.get("/api/v1/sessions", params={"state": "requested"})
                return r.json()["data"] or None if r.status_code == 200 else None

            await wait_for(session_requested, 90, "the tour's session request")
        async with browser_context(tmp_path / "chromium") as context:
            page = await context.new_page()
            await log_in(page, url, "engineer", pw["engineer"])
            await expect(page.locator("svg.map")).to_be_visible()
            await screenshots(page, "demo-fleet")
            await page.goto(f"{url}/faults")
            await expect(page.locator("body[data-live=on]")).to_be_visible()
            rows = page.locator("tr[data-code]")
            before = await rows.count()
            unit = run.sim.units[-1]  # a unit of the second site; the tour tripped the first
            unit.inject("over_temperature")
            await expect(rows).to_have_count(before + 1, timeout=45_000)
            await screenshots(page, "demo-faults")
            await page.goto(f"{url}/sites/site-sunrise")
            await expect(page.locator("tr[data-unit]").first).to_be_visible()
            await screenshots(page, "demo-site")
            await page.goto(f"{url}/tickets")
            await screenshots(page, "demo-tickets")
            await page.goto(f"{url}/sla")
            await expect(page.locator("svg.chart").first).to_be_visible()
            await screenshots(page, "demo-sla")
            await page.get_by_role("button", name="Log out").click()

            await log_in(page, url, "sunrise", pw["sunrise"])
            await page.goto(f"{url}/sessions")
            waiting = page.locator("tr[data-state=requested] a").first
            await waiting.click()
            await page.get_by_role("button", name="Approve access").click()
            await expect(page.locator(".session-state")).to_have_text("approved")
            await screenshots(page, "demo-session-approved")
            await page.get_by_role("link", name="Upgrade plans").click()
            issued = page.locator("tr[data-state=issued] a").first  # the tour's written plan
            await expect(issued).to_be_visible(timeout=60_000)
            await screenshots(page, "demo-plans")
            await issued.click()
            await expect(page.get_by_role("button", name="Confirm and sign")).to_be_visible()
            await screenshots(page, "demo-plan")
            other = await page.goto(f"{url}/sites/site-harbour")
            assert other is not None
            assert other.status == 404
    finally:
        stop.set()
        await wait_for(demo, 60, "the demo to stop")
