"""Commissioning and release pages: scoping, the merged report, downloads, acknowledgement."""

from __future__ import annotations

import secrets

from server.commissioning import service
from server.core.db import Database
from server.upgrades.models import ReleasePackage
from tests.server.test_api_common import World, client_for
from tests.server.web.helpers import csrf_of, log_in, name_of

SERIAL = "BS-WEB-0001"


async def _issued_plan(world: World, db: Database) -> int:
    """An on-site plan of the own site, issued (written plan v1), not yet acknowledged."""
    async with db.session() as session:
        plan = await service.create_plan(
            session, site_id=world.own.site_id, actor="lead", now=world.clock(),
            title=f"Hafen {world.own.marker}", mode="onsite", visits=1,
            technicians=["Ana Ruiz"], equipment=[
                {"series": "EMU-BS", "count": 2, "serials": [SERIAL, "BS-WEB-GONE"]}])
        assert plan.id is not None
        await service.issue_plan(session, plan.id, actor="lead", now=world.clock())
        return plan.id


async def _record(world: World, db: Database, plan_id: int) -> None:
    """Schedule the plan and record one passed and one failed on-site check of one unit."""
    async with db.session() as session:
        await service.transition(session, plan_id, "scheduled", actor="lead", now=world.clock())
        plan = await service.get_plan(session, plan_id)
        checks = [i["name"] for i in plan.checklist["EMU-BS"] if i["where"] == "onsite"]
        await service.record_onsite(session, plan_id, [
            {"serial": SERIAL, "series": "EMU-BS", "check": checks[0], "passed": True,
             "detail": "all good", "evidence": {"photo": "earth-0001.jpg"}},
            {"serial": SERIAL, "series": "EMU-BS", "check": checks[1], "passed": False,
             "detail": "needs another look", "evidence": {"reading": "0.2"}},
        ], technician="Ana Ruiz", now=world.clock())


async def test_another_organisations_customer_gets_404(world: World, db: Database) -> None:
    plan_id = await _issued_plan(world, db)
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.other.user_id))
        listing = await client.get("/commissioning")
        assert listing.status_code == 200
        assert world.own.marker not in listing.text
        for path in ("", "/document", "/document?format=pdf", "/report?format=json"):
            assert (await client.get(f"/commissioning/{plan_id}{path}")).status_code == 404
        page = await client.get("/commissioning")
        r = await client.post(f"/commissioning/{plan_id}/acknowledge",
                              data={"csrf_token": csrf_of(page.text), "agree": "yes"})
        assert r.status_code == 404


async def test_customer_reads_and_acknowledges_its_plan(world: World, db: Database) -> None:
    plan_id = await _issued_plan(world, db)
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.own.user_id))
        listing = await client.get("/commissioning")
        assert f"Hafen {world.own.marker}" in listing.text
        assert "waiting for your acknowledgement" in listing.text
        assert 'href="/commissioning"' in listing.text  # in the navigation
        page = await client.get(f"/commissioning/{plan_id}")
        assert page.status_code == 200
        assert "Ana Ruiz" in page.text
        assert "EMU-BS" in page.text
        assert "Acknowledge the plan" in page.text
        assert "<label><input type=\"checkbox\" name=\"agree\"" in page.text  # labelled
        assert "planned than found" in page.text or "BS-WEB-GONE" in page.text  # missing
        doc = await client.get(f"/commissioning/{plan_id}/document")
        assert doc.status_code == 200
        assert doc.headers["content-security-policy"] == "sandbox"
        pdf = await client.get(f"/commissioning/{plan_id}/document?format=pdf")
        assert pdf.content.startswith(b"%PDF")
        no_csrf = await client.post(f"/commissioning/{plan_id}/acknowledge",
                                    data={"agree": "yes"})
        assert no_csrf.status_code == 403
        ack = await client.post(f"/commissioning/{plan_id}/acknowledge",
                                data={"agree": "yes", "csrf_token": csrf_of(page.text)})
        assert ack.status_code == 303
        after = await client.get(f"/commissioning/{plan_id}")
        assert "Acknowledge the plan" not in after.text
        assert "<dt>Acknowledged</dt><dd>not yet" not in after.text
    async with db.session() as session:
        plan = await service.get_plan(session, plan_id)
        assert plan.acknowledged_by == await name_of(db, world.own.user_id)


async def test_report_shows_pass_fail_with_evidence_and_downloads(world: World, db: Database
                                                                  ) -> None:
    plan_id = await _issued_plan(world, db)
    async with db.session() as session:
        await service.acknowledge_plan(session, plan_id, actor="customer", now=world.clock())
    await _record(world, db, plan_id)
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.engineer_id))
        page = await client.get(f"/commissioning/{plan_id}")
        assert page.status_code == 200
        text = page.text
        assert f'data-serial="{SERIAL}" data-status="fail"' in text
        assert 'data-passed="true"' in text
        assert 'data-passed="false"' in text
        assert "✖ FAIL" in text  # a word and a sign, not only a colour
        assert "photo: earth-0001.jpg" in text
        assert "needs another look" in text
        assert "BS-WEB-GONE" in text  # the missing unit
        assert "Acknowledge the plan" not in text  # staff do not acknowledge
        for fmt in ("", "?format=pdf", "?format=json"):
            assert f'href="/commissioning/{plan_id}/report{fmt}"' in text
        js = await client.get(f"/commissioning/{plan_id}/report?format=json")
        assert js.json()["summary"]["failed"] == 1
        html = await client.get(f"/commissioning/{plan_id}/report")
        assert html.status_code == 200
        assert SERIAL in html.text
        pdf = await client.get(f"/commissioning/{plan_id}/report?format=pdf")
        assert pdf.content.startswith(b"%PDF")
        stored = await client.get(f"/commissioning/{plan_id}/report?format=json&version=1")
        assert stored.status_code == 200
        r = await client.post(f"/commissioning/{plan_id}/acknowledge",
                              data={"csrf_token": csrf_of(text)})
        assert r.status_code == 403


async def test_releases_page_is_for_staff(world: World, db: Database) -> None:
    # The session's database is shared by tests: this release gets a series of its own.
    series, version = f"T-{secrets.token_hex(4)}", "7.1.0"
    async with db.session() as session:
        session.add(ReleasePackage(
            series=series, version=version, sha256="0" * 64, size=1, image_sha256="0" * 64,
            signature="", path="none.bin", notes="fixes the fan curve",
            manifest={"key_id": "ab12cd34", "fixes": {"fault_codes": ["FAN_STALL"],
                                                       "tickets": [42]}}))
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.engineer_id))
        assert (await client.get("/releases")).status_code == 200
        page = await client.get("/releases", params={"series": series})
        assert page.status_code == 200
        assert f'<option value="{series}" selected>' in page.text
        for text in (version, "fixes the fan curve", "FAN_STALL", 'href="/tickets/42"',
                     "ab12cd34"):
            assert text in page.text
        assert 'href="/releases"' in (await client.get("/plans")).text
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.own.user_id))
        assert (await client.get("/releases")).status_code == 403
        assert 'href="/releases"' not in (await client.get("/plans")).text
