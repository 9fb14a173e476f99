"""Dashboard pages over HTTP (no browser): log-in, CSRF, expiry, scoping, live fragments, SSE.

Uses the API's seeded world (two organisations, "own" and "other", whose every text carries
a marker), so a leak of the other organisation into a customer's page is visible.
"""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest

from server.core.db import Database
from server.models import Fault
from tests.server.test_api_common import World, client_for
from tests.server.web.helpers import PASSWORD, csrf_of, log_in, name_of, serving
from tests.support.waiting import wait_for


async def test_pages_need_a_log_in_and_forms_have_labels(world: World) -> None:
    async with client_for(world.app) as client:
        r = await client.get("/faults?class=A")
        assert r.status_code == 303
        assert r.headers["location"] == "/login?next=%2Ffaults%3Fclass%3DA"
        page = (await client.get("/login")).text
    assert '<label for="username">' in page
    assert 'id="username"' in page
    assert '<label for="password">' in page
    assert 'id="password"' in page
    assert 'name="viewport"' in page
    assert "http://" not in page.replace("http://www.w3.org", "")  # nothing from elsewhere


async def test_log_in_needs_the_csrf_token_and_the_right_password(world: World, db: Database
                                                                   ) -> None:
    name = await name_of(db, world.own.user_id)
    async with client_for(world.app) as client:
        token = csrf_of((await client.get("/login")).text)
        no_csrf = await client.post("/login", data={"username": name, "password": PASSWORD})
        assert no_csrf.status_code == 403
        wrong = await client.post("/login", data={"username": name, "password": "x" * 12,
                                                  "csrf_token": token})
        assert wrong.status_code == 401
        assert "wrong password" in wrong.text
        unknown = await client.post("/login", data={"username": "nobody", "password": PASSWORD,
                                                    "csrf_token": token})
        assert unknown.status_code == 401
        ok = await client.post("/login", data={"username": name, "password": PASSWORD,
                                               "csrf_token": token, "next": "//evil.example/"})
        assert ok.status_code == 303
        assert ok.headers["location"] == "/"  # no open redirect
        fleet = await client.get("/")
        assert fleet.status_code == 200
        # the session got a new CSRF token at log-in: the old one no longer works
        stale = await client.post("/logout", data={"csrf_token": token})
        assert stale.status_code == 403
        out = await client.post("/logout", data={"csrf_token": csrf_of(fleet.text)})
        assert out.status_code == 303
        assert (await client.get("/")).status_code == 303


async def test_customer_sees_only_its_own_sites(world: World, db: Database) -> None:
    name = await name_of(db, world.own.user_id)
    async with client_for(world.app) as client:
        await log_in(client, name)
        fleet = (await client.get("/")).text
        assert world.own.site_code in fleet
        assert world.other.marker not in fleet
        own = await client.get(f"/sites/{world.own.site_code}")
        assert own.status_code == 200
        assert f"emu-{world.own.marker}" in own.text
        other = await client.get(f"/sites/{world.other.site_code}")
        assert other.status_code == 404
        assert f"Site {world.other.marker}" not in other.text  # only the asked-for code
        faults = (await client.get("/faults?state=all")).text
        assert f"fault A {world.own.marker}" in faults
        assert world.other.marker not in faults
        foreign = await client.get(f"/faults/{world.other.fault_ids[0]}")
        assert foreign.status_code == 404
        filtered = await client.get(f"/faults?site={world.other.site_code}")
        assert filtered.status_code == 404


async def test_engineer_sees_every_site_and_fault_classes(world: World, db: Database) -> None:
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.engineer_id))
        fleet = (await client.get("/")).text
        assert world.own.site_code in fleet
        assert world.other.site_code in fleet
        faults = (await client.get("/faults?class=A&class=B")).text
        assert f"fault A {world.other.marker}" in faults
        assert f"fault D {world.other.marker}" not in faults
        # the class is written out, not only coloured
        assert "A · function lost" in faults
        one = await client.get(f"/faults/{world.own.fault_ids[0]}")
        assert one.status_code == 200
        assert world.own.marker in one.text


async def test_a_live_region_is_rendered_alone(world: World, db: Database) -> None:
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.engineer_id))
        fragment = await client.get("/faults?fragment=list")
        assert fragment.status_code == 200
        assert "<html" not in fragment.text
        assert "<table" in fragment.text
        assert (await client.get("/faults?fragment=nope")).status_code == 404
        site = await client.get(f"/sites/{world.own.site_code}?fragment=units")
        assert f"emu-{world.own.marker}" in site.text


async def test_a_log_in_expires(world: World, db: Database) -> None:
    name = await name_of(db, world.own.user_id)
    async with client_for(world.app) as client:
        await log_in(client, name)
        assert (await client.get("/")).status_code == 200
        world.clock.now += timedelta(seconds=world.app.state.settings.web.session_max_age_s + 1)
        try:
            r = await client.get("/")
        finally:
            world.clock.now -= timedelta(seconds=world.app.state.settings.web.session_max_age_s
                                         + 1)
        assert r.status_code == 303
        assert r.headers["location"].startswith("/login")


async def test_password_api(world: World, db: Database) -> None:
    async with client_for(world.app, world.admin_token) as admin:
        bad = await admin.post(f"/api/v1/users/{world.own.user_id}/password",
                               json={"password": "short"})
        assert bad.status_code == 422
        ok = await admin.post(f"/api/v1/users/{world.own.user_id}/password",
                              json={"password": "a new long password"})
        assert ok.status_code == 204
    async with client_for(world.app, world.own.token) as me:
        wrong = await me.post("/api/v1/users/me/password",
                              json={"current_password": PASSWORD, "new_password": "x" * 12})
        assert wrong.status_code == 403
        changed = await me.post("/api/v1/users/me/password",
                                json={"current_password": "a new long password",
                                      "new_password": "yet another password"})
        assert changed.status_code == 204
        users = await me.post(f"/api/v1/users/{world.own.user_id}/password",
                              json={"password": "a new long password"})
        assert users.status_code == 403
        shown = (await me.get("/api/v1/users/me")).json()
        assert "password_hash" not in shown
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.own.user_id), "yet another password")


async def test_unknown_pages_are_html_and_unknown_api_routes_json(world: World) -> None:
    async with client_for(world.app) as client:
        page = await client.get("/no-such-page")
        assert page.status_code == 404
        assert "<html" in page.text
        api = await client.get("/api/v1/no-such-route")
        assert api.status_code == 404
        assert api.json()["detail"]
        css = await client.get("/static/app.css")
        assert css.status_code == 200
        assert "text/css" in css.headers["content-type"]


async def test_events_stream_names_what_changed(world: World, db: Database) -> None:
    world.app.state.settings.web.__dict__["live_interval_s"] = 0.1  # frozen model: test only
    async with serving(world.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        await log_in(client, await name_of(db, world.engineer_id))
        assert (await client.get("/events?topic=bogus")).status_code == 422
        async with client.stream("GET", "/events?topic=faults&topic=units") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()

            async def next_event() -> tuple[str, str]:
                event = data = ""
                async for line in lines:
                    if line.startswith("event:"):
                        event = line.split(":", 1)[1].strip()
                    elif line.startswith("data:"):
                        data = line.split(":", 1)[1].strip()
                    elif not line and event:
                        return event, data
                raise AssertionError("the stream ended")

            hello = await wait_for(next_event(), 10, "the hello event")
            assert hello[0] == "hello"
            assert json.loads(hello[1])["topics"] == ["faults", "units"]
            now = world.clock()
            async with db.session() as session:
                session.add(Fault(site_id=world.own.site_id, unit_id=world.own.unit_id,
                                  code="live-test", fault_class="B", title="live fault",
                                  opened_at=now, last_seen_at=now))
            change = await wait_for(next_event(), 10, "a change event")
            assert change == ("change", "faults")


async def _ticket(db: Database, world: World, cls: str = "A") -> int:
    from server.tickets import service

    async with db.session() as session:
        ticket = await service.open_ticket(session, site_id=world.own.site_id, source="phone",
                                           title=f"ticket {world.own.marker}", fault_class=cls,
                                           actor="test", now=world.clock())
        assert ticket.id is not None
        return ticket.id


async def test_ticket_clocks_count_down_with_words_not_only_colour(
        world: World, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # the session's database holds other tests' overdue tickets, which come first in the
    # fleet page's short at-risk list: lift its limit so this ticket is listed too
    monkeypatch.setattr("server.web.tickets.AT_RISK_LIMIT", 100_000)
    tid = await _ticket(db, world)
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.engineer_id))
        page = (await client.get("/tickets?fragment=list")).text
        assert f"#{tid} ticket {world.own.marker}" in page
        assert "on track" in page
        world.clock.now += timedelta(minutes=4)  # respond in 5 min: warning at 75 %
        try:
            warn = (await client.get("/tickets?fragment=list")).text
            risk = (await client.get("/?fragment=risk")).text
            world.clock.now += timedelta(minutes=2)
            breach = (await client.get(f"/tickets/{tid}")).text
        finally:
            world.clock.now -= timedelta(minutes=6)
    assert "WARNING" in warn
    assert "⚠" in warn
    assert f"#{tid}" in risk
    assert "BREACHED" in breach
    assert "✖" in breach


async def test_engineer_records_a_call_and_a_diagnosis(world: World, db: Database) -> None:
    tid = await _ticket(db, world, "B")
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.engineer_id))
        page = (await client.get(f"/tickets/{tid}")).text
        assert '<label for="phone-notes">' in page
        token = csrf_of(page)
        r = await client.post(f"/tickets/{tid}/phone", data={
            "notes": "customer reports a hot cabinet", "outcome": "needs_remote_support",
            "csrf_token": token})
        assert r.status_code == 303
        r = await client.post(f"/tickets/{tid}/diagnosis", data={
            "diagnosis": "fan 2 failed", "proposed_solution": "replace fan 2",
            "csrf_token": token})
        assert r.status_code == 303
        bad = await client.post(f"/tickets/{tid}/transition", data={
            "state": "new", "csrf_token": token})
        assert bad.status_code == 409
        page = (await client.get(f"/tickets/{tid}")).text
    assert "customer reports a hot cabinet" in page
    assert "fan 2 failed" in page
    assert "replace fan 2" in page


async def test_customer_comments_but_does_not_move_tickets(world: World, db: Database) -> None:
    tid = await _ticket(db, world)
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.other.user_id))
        assert (await client.get(f"/tickets/{tid}")).status_code == 404
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.own.user_id))
        page = (await client.get(f"/tickets/{tid}")).text
        assert 'action="/tickets/' in page
        assert "phone-notes" not in page
        token = csrf_of(page)
        r = await client.post(f"/tickets/{tid}/comment", data={"text": "thanks, on site at 3",
                                                               "csrf_token": token})
        assert r.status_code == 303
        r = await client.post(f"/tickets/{tid}/transition", data={"state": "closed",
                                                                  "csrf_token": token})
        assert r.status_code == 403
        assert "thanks, on site at 3" in (await client.get(f"/tickets/{tid}")).text


async def test_session_request_approve_revoke_and_recording(world: World, db: Database) -> None:
    from server.sessions.models import SessionRecording

    tid = await _ticket(db, world, "B")
    engineer = await name_of(db, world.engineer_id)
    async with client_for(world.app) as eng:
        await log_in(eng, engineer)
        page = (await eng.get("/sessions")).text
        assert '<label for="req-reason">' in page
        r = await eng.post("/sessions", data={
            "ticket_id": str(tid), "reason": "look at the inverter log", "shell": "true",
            "units": f"emu-{world.own.marker}", "minutes": "30", "csrf_token": csrf_of(page)})
        assert r.status_code == 303, r.text
        sid = r.headers["location"].rsplit("/", 1)[1]
        assert "Approve access" not in (await eng.get(f"/sessions/{sid}")).text
    async with client_for(world.app) as other:
        await log_in(other, await name_of(db, world.other.user_id))
        assert (await other.get(f"/sessions/{sid}")).status_code == 404
        assert sid not in (await other.get("/sessions")).text
    async with client_for(world.app) as cust:
        await log_in(cust, await name_of(db, world.own.user_id))
        page = (await cust.get(f"/sessions/{sid}")).text
        assert "look at the inverter log" in page
        r = await cust.post(f"/sessions/{sid}/approve", data={"csrf_token": csrf_of(page)})
        assert r.status_code == 303
        page = (await cust.get(f"/sessions/{sid}")).text
        assert 'data-state="approved"' in page
        assert "hash chain verifies" in page
        r = await cust.post(f"/sessions/{sid}/revoke", data={"csrf_token": csrf_of(page)})
        assert r.status_code == 303
        assert 'data-state="revoked"' in (await cust.get(f"/sessions/{sid}")).text
        now = world.clock()
        cast = ('{"version": 2, "width": 80, "height": 24}\n[0.1, "o", "$ uptime\\r\\n"]\n'
                '[0.5, "o", "\\u001b[1mup 3 days\\u001b[0m\\r\\n"]\n')
        async with db.session() as session:
            rec = SessionRecording(session_id=sid, name="shell-1", started_at=now, ended_at=now,
                                   sha256="0" * 64, cast=cast)
            session.add(rec)
            await session.flush()
            rid = rec.id
        replay = (await cust.get(f"/sessions/{sid}/recordings/{rid}")).text
        assert "up 3 days" in replay
        assert "\x1b" not in replay


async def test_plans_are_scoped_to_the_customer(world: World, db: Database) -> None:
    from tests.support.upgrades_seed import seed_upgrade_plan

    async with db.session() as session:
        plan_id, _ = await seed_upgrade_plan(session, world.own.org_id, world.own.site_id,
                                             world.own.unit_id, world.own.marker, world.clock())
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.other.user_id))
        assert (await client.get(f"/plans/{plan_id}")).status_code == 404
        assert (await client.get(f"/plans/{plan_id}/document")).status_code == 404
        assert world.own.marker not in (await client.get("/plans")).text
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.own.user_id))
        page = await client.get(f"/plans/{plan_id}")
        assert page.status_code == 200
        assert f"impact {world.own.marker}" in page.text
        doc = await client.get(f"/plans/{plan_id}/document")
        assert doc.headers["content-security-policy"] == "sandbox"
        # a running plan cannot be confirmed again
        r = await client.post(f"/plans/{plan_id}/confirm", data={
            "window": "0", "personnel": "A", "signature": "B", "csrf_token": csrf_of(page.text)})
        assert r.status_code == 409


async def test_sla_report_page(world: World, db: Database) -> None:
    tid = await _ticket(db, world, "A")
    month = world.clock().strftime("%Y-%m")
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.engineer_id))
        page = await client.get(f"/sla?month={month}")
        assert page.status_code == 200
        assert "<svg" in page.text
        assert f"SLA report {month}" in page.text
        assert (await client.get("/sla?month=nope")).status_code == 422
    async with client_for(world.app) as client:
        await log_in(client, await name_of(db, world.other.user_id))
        assert world.own.marker not in (await client.get(f"/sla?month={month}")).text
    assert tid
