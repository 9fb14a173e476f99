"""The dashboard in a real browser (Debian's Chromium through Playwright).

The server runs on a loopback socket over the seeded test world; each test logs in through
the form like a person would. Screenshots of every page visited are kept under
tests/artifacts/screens/ at 1366x768 and 390 px.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Page, expect
from sqlmodel import select

from server.core.db import Database
from server.models import Fault, User
from tests.server.test_api_common import World
from tests.server.web.helpers import PASSWORD, name_of, serving
from tests.support.browser import browser_context, needs_chromium, screenshots

pytestmark = [needs_chromium, pytest.mark.integration]


@pytest.fixture
async def world(world: World) -> World:
    """The dashboard tests' world (its users can log in), with live updates every 0.2 s."""
    world.app.state.settings.web.__dict__["live_interval_s"] = 0.2  # frozen model: test only
    return world


async def log_in(page: Page, url: str, name: str) -> None:
    """Through the form, as a person would."""
    await page.goto(f"{url}/login")
    await page.get_by_label("User name").fill(name)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Fleet")).to_be_visible()


async def test_engineer_sees_a_fault_appear_without_reloading(
    world: World, db: Database, tmp_path: Path
) -> None:
    name = await name_of(db, world.engineer_id)
    async with serving(world.app) as url, browser_context(tmp_path / "chromium") as context:
        page = await context.new_page()
        await log_in(page, url, name)
        await screenshots(page, "fleet")
        await page.goto(f"{url}/faults")
        await expect(page.locator("body[data-live=on]")).to_be_attached()
        marker = page.evaluate_handle("window.performance.timeOrigin")  # same document after
        origin = await (await marker).json_value()
        code = f"injected-{world.own.marker}"
        assert await page.locator(f"tr[data-code='{code}']").count() == 0
        now = world.clock()
        async with db.session() as session:  # what the fault engine writes on an injection
            session.add(Fault(site_id=world.own.site_id, unit_id=world.own.unit_id, code=code,
                              fault_class="A", title="Unit tripped (injected)", opened_at=now,
                              last_seen_at=now, evidence={"injected": True}))
        row = page.locator(f"tr[data-code='{code}']")
        await expect(row).to_be_visible(timeout=15_000)
        await expect(row).to_contain_text("A · function lost")  # the class in words, too
        assert await page.evaluate("window.performance.timeOrigin") == origin  # no reload
        await screenshots(page, "faults")
        await page.goto(f"{url}/sites/{world.own.site_code}")
        await expect(page.get_by_role("heading", name="Units")).to_be_visible()
        await screenshots(page, "site")
        await page.goto(f"{url}/faults/{world.own.fault_ids[0]}")
        await screenshots(page, "fault")


async def test_customer_cannot_open_another_organisations_site(
    world: World, db: Database, tmp_path: Path
) -> None:
    name = await name_of(db, world.own.user_id)
    async with serving(world.app) as url, browser_context(tmp_path / "chromium") as context:
        page = await context.new_page()
        await log_in(page, url, name)
        await expect(page.get_by_role("link", name=f"Site {world.own.marker}")).to_be_visible()
        assert world.other.marker not in await page.content()
        response = await page.goto(f"{url}/sites/{world.other.site_code}")
        assert response is not None
        assert response.status == 404
        await expect(page.get_by_role("heading", name="Not found")).to_be_visible()
        assert f"Site {world.other.marker}" not in await page.content()
        await screenshots(page, "customer-other-site")
        await page.goto(f"{url}/login")
        await screenshots(page, "login")


async def test_customer_approves_a_session(world: World, db: Database, tmp_path: Path) -> None:
    from protocols.sessions import Scope
    from server.sessions.ops import SessionOps
    from server.tickets import service

    customer = await name_of(db, world.own.user_id)
    engineer_name = await name_of(db, world.engineer_id)
    async with db.session() as session:
        engineer = (await session.exec(select(User).where(User.name == engineer_name))).one()
        ticket = await service.open_ticket(session, site_id=world.own.site_id, source="phone",
                                           title="Inverter trips at noon", fault_class="B",
                                           actor=engineer_name, now=world.clock())
        assert ticket.id is not None
        row = await SessionOps().request(session, engineer, ticket_id=ticket.id,
                                         reason="read the inverter's fault log",
                                         scope=Scope(shell=True),  # noqa: S604
                                         max_duration_s=3600,
                                         now=world.clock())
        sid = row.id
    async with serving(world.app) as url, browser_context(tmp_path / "chromium") as context:
        page = await context.new_page()
        await log_in(page, url, customer)
        await page.get_by_role("link", name="Remote sessions").click()
        await expect(page.locator(f"tr[data-session='{sid}']")).to_be_visible()
        await screenshots(page, "sessions")
        await page.get_by_role("link", name=sid).click()
        await expect(page.get_by_text("read the inverter's fault log")).to_be_visible()
        await screenshots(page, "session-requested")
        await page.get_by_role("button", name="Approve access").click()
        await expect(page.locator(".session-state")).to_have_text("approved")
        await expect(page.get_by_role("button", name="Revoke now")).to_be_visible()
        await screenshots(page, "session-approved")
        await page.goto(f"{url}/tickets/{ticket.id}")
        await expect(page.locator("li[data-kind='session_requested']")).to_be_visible()
        await screenshots(page, "ticket")
        await page.goto(f"{url}/tickets")
        await screenshots(page, "tickets")


async def test_customer_confirms_and_signs_a_plan(world: World, db: Database,
                                                  tmp_path: Path) -> None:
    from server.upgrades.models import ReleasePackage, UpgradePlan
    from tests.support.upgrades_seed import seed_upgrade_plan

    customer = await name_of(db, world.own.user_id)
    async with db.session() as session:
        plan_id, release_id = await seed_upgrade_plan(
            session, world.own.org_id, world.own.site_id, world.own.unit_id, world.own.marker,
            world.clock())
        release = await session.get(ReleasePackage, release_id)
        assert release is not None
        release.manifest = {"fixes": {"fault_codes": ["over_temperature"], "tickets": []}}
        session.add(release)
        plan = await session.get(UpgradePlan, plan_id)
        assert plan is not None
        plan.state, plan.confirmed_window = "issued", None
        plan.windows = [{"start": "2031-03-20T22:00", "end": "2031-03-21T02:00"},
                        {"start": "2031-03-27T22:00", "end": "2031-03-28T02:00"}]
        session.add(plan)
    async with serving(world.app) as url, browser_context(tmp_path / "chromium") as context:
        page = await context.new_page()
        await log_in(page, url, customer)
        await page.get_by_role("link", name="Upgrade plans").click()
        await expect(page.locator(f"tr[data-plan='{plan_id}']")).to_contain_text("issued")
        await screenshots(page, "plans")
        await page.locator(f"tr[data-plan='{plan_id}'] a").click()
        await page.get_by_label("2031-03-27T22:00 to 2031-03-28T02:00").check()
        await page.get_by_label("Maintenance personnel on site").fill("Li Wei\nAnna Berg")
        await page.get_by_label("Signature").fill("Mei Chen")
        await screenshots(page, "plan-issued")
        await page.get_by_role("button", name="Confirm and sign").click()
        await expect(page.locator(".plan-state")).to_have_text("confirmed")
        await expect(page.get_by_text("signed by Mei Chen")).to_be_visible()
        await screenshots(page, "plan-confirmed")
    async with db.session() as session:
        plan = await session.get(UpgradePlan, plan_id)
        assert plan is not None
        assert plan.confirmed_by == "Mei Chen"
        assert plan.confirmed_personnel == ["Li Wei", "Anna Berg"]
        assert plan.confirmed_window == {"start": "2031-03-27T22:00", "end": "2031-03-28T02:00"}


async def test_customer_acknowledges_a_commissioning_plan(world: World, db: Database,
                                                          tmp_path: Path) -> None:
    from server.commissioning import service
    from tests.server.web.test_commissioning_pages import _issued_plan

    plan_id = await _issued_plan(world, db)
    customer = await name_of(db, world.own.user_id)
    async with serving(world.app) as url, browser_context(tmp_path / "chromium") as context:
        page = await context.new_page()
        await log_in(page, url, customer)
        await page.get_by_role("link", name="Commissioning").click()
        await expect(page.locator(f"tr[data-cplan='{plan_id}']")).to_contain_text("issued")
        await screenshots(page, "commissioning")
        await page.locator(f"tr[data-cplan='{plan_id}'] a").click()
        await page.get_by_label("I have read the written plan").check()
        await screenshots(page, "commissioning-plan")
        await page.get_by_role("button", name="Acknowledge").click()
        await expect(page.get_by_role("heading", name="Acknowledge the plan")).to_have_count(0)
        await screenshots(page, "commissioning-acknowledged")
    async with db.session() as session:
        plan = await service.get_plan(session, plan_id)
        assert plan.acknowledged_by == customer


async def test_engineer_sees_the_releases(world: World, db: Database, tmp_path: Path) -> None:
    from tests.support.upgrades_seed import seed_upgrade_plan

    async with db.session() as session:
        await seed_upgrade_plan(session, world.own.org_id, world.own.site_id,
                                world.own.unit_id, world.own.marker, world.clock())
    engineer = await name_of(db, world.engineer_id)
    async with serving(world.app) as url, browser_context(tmp_path / "chromium") as context:
        page = await context.new_page()
        await log_in(page, url, engineer)
        await page.get_by_role("link", name="Upgrade plans").click()
        await page.get_by_role("link", name="Releases").click()
        await expect(page.get_by_role("heading", name="Releases")).to_be_visible()
        await expect(page.locator("tr[data-release]").first).to_contain_text("EMU-BS")
        await screenshots(page, "releases")
