"""`/api/v1/tickets`, `/parts`, `/sla`: roles, scoping, the state machine at the edge, parts."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest
from sqlmodel import select

from server.core.db import Database
from server.sla.models import SlaContract, SlaNotification
from tests.server.test_api_common import World, add_user, client_for, seed_world


@pytest.fixture
async def world(db: Database) -> World:
    """A freshly seeded world with a named engineer (`world.extra['engineer']`)."""
    w = await seed_world(db)
    async with db.session() as s:
        _, token, _ = await add_user(s, f"eve-{w.own.marker}", "engineer")
        s.add(SlaContract(org_id=w.own.org_id, terms={"chain": [
            {"level": "lead", "email": "lead@vendor.example"}]}))
    w.engineer_token = token
    return w


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


async def test_customers_open_and_see_their_own_tickets_only(world: World) -> None:
    async with client_for(world.app, world.own.token) as own, \
            client_for(world.app, world.other.token) as other:
        t = _ok(await own.post("/api/v1/tickets", json={
            "site_id": world.own.site_id, "title": "battery alarm", "fault_class": "B"}), 201)
        assert t["source"] == "portal"
        assert t["state"] == "new"
        assert [c["kind"] for c in t["clocks"]] == ["response", "processing", "resolution"]
        assert (await own.post("/api/v1/tickets", json={
            "site_id": world.other.site_id, "title": "x"})).status_code == 404
        assert (await own.post("/api/v1/tickets", json={
            "site_id": world.own.site_id, "title": "x", "source": "phone"})).status_code == 403
        assert (await other.get(f"/api/v1/tickets/{t['id']}")).status_code == 404
        assert t["id"] not in [x["id"] for x in _ok(await other.get("/api/v1/tickets"))["data"]]
        assert t["id"] in [x["id"] for x in _ok(await own.get("/api/v1/tickets"))["data"]]
        _ok(await own.post(f"/api/v1/tickets/{t['id']}/comments", json={"text": "urgent"}), 201)
        assert (await other.post(f"/api/v1/tickets/{t['id']}/comments",
                                 json={"text": "x"})).status_code == 404
        assert (await own.post(f"/api/v1/tickets/{t['id']}/transition",
                               json={"state": "closed"})).status_code == 403


async def test_engineer_works_a_ticket_through_its_states(world: World) -> None:
    async with client_for(world.app, world.engineer_token) as eng:
        t = _ok(await eng.post("/api/v1/tickets", json={
            "site_id": world.own.site_id, "title": "unit tripped", "source": "phone",
            "fault_class": "A", "unit_ids": [world.own.unit_id]}), 201)
        path = f"/api/v1/tickets/{t['id']}"
        me = _ok(await eng.get("/api/v1/users/me"))["name"]
        _ok(await eng.post(f"{path}/assign", json={"assignee": me}))
        t = _ok(await eng.post(f"{path}/phone", json={
            "notes": "customer reset it twice", "outcome": "needs_remote_support"}))
        assert t["state"] == "in_progress"
        assert t["acknowledged_at"] is not None
        assert (await eng.post(f"{path}/transition",
                               json={"state": "new"})).status_code == 409
        assert (await eng.post(f"{path}/transition",
                               json={"state": "sleeping"})).status_code == 422
        t = _ok(await eng.post(f"{path}/pause", json={"reason": "consent"}))
        assert {c["kind"]: c["due_at"] for c in t["clocks"]}["resolution"] is None
        t = _ok(await eng.post(f"{path}/resume", json={"reason": "consent"}))
        _ok(await eng.post(f"{path}/links", json={"kind": "session", "ref": "42"}), 201)
        t = _ok(await eng.post(f"{path}/diagnosis", json={
            "diagnosis": "DC contactor welded", "proposed_solution": "replace contactor K3"}))
        assert t["proposed_solution"] == "replace contactor K3"
        t = _ok(await eng.post(f"{path}/transition", json={"state": "resolved", "note": "ok"}))
        assert {c["kind"]: c["outcome"] for c in t["clocks"]} == {
            "response": "met", "processing": "met", "resolution": "met"}
        kinds = [e["kind"] for e in t["events"]]
        assert kinds == ["opened", "assigned", "phone_support", "state", "clocks_paused",
                         "clocks_resumed", "linked", "diagnosis", "state"]
        assert (await eng.get("/api/v1/tickets/999999999")).status_code == 404
        listed = _ok(await eng.get("/api/v1/tickets", params={
            "site_id": world.own.site_id, "state": "resolved", "class": "A"}))
        assert [x["id"] for x in listed["data"]] == [t["id"]]


async def test_a_c_ticket_closes_when_its_release_link_is_marked_installed(
        world: World) -> None:
    async with client_for(world.app, world.engineer_token) as eng:
        t = _ok(await eng.post("/api/v1/tickets", json={
            "site_id": world.own.site_id, "title": "derating at 30 C", "source": "phone",
            "fault_class": "C"}), 201)
        path = f"/api/v1/tickets/{t['id']}"
        _ok(await eng.post(f"{path}/transition", json={"state": "awaiting_release"}))
        link = _ok(await eng.post(f"{path}/links", json={"kind": "release",
                                                         "ref": "EMU-BS/2.4.0"}), 201)
        t = _ok(await eng.post(f"{path}/links/{link['id']}/installed"))
        assert t["state"] == "closed"
        assert [x["state"] for x in t["links"] if x["kind"] == "release"] == ["installed"]
        assert (await eng.post(f"{path}/links/999999/installed")).status_code == 404


async def test_parts_reserve_then_backorder_warns_for_a_and_b(world: World, db: Database) -> None:
    part_no = f"K3-{secrets.token_hex(3)}"
    async with client_for(world.app, world.admin_token) as admin, \
            client_for(world.app, world.engineer_token) as eng:
        _ok(await admin.post("/api/v1/parts", json={
            "part_no": part_no, "series": "EMU-BS", "name": "DC contactor"}), 201)
        part = _ok(await admin.put(f"/api/v1/parts/{part_no}/stock",
                                   json={"depot": "shanghai", "quantity": 1}))
        assert part["stock"] == {"shanghai": 1}
        assert (await eng.post("/api/v1/parts", json={
            "part_no": "x", "series": "EMU-BS", "name": "x"})).status_code == 403
        t = _ok(await eng.post("/api/v1/tickets", json={
            "site_id": world.own.site_id, "title": "tripped", "source": "phone",
            "fault_class": "A"}), 201)
        first = _ok(await eng.post(f"/api/v1/tickets/{t['id']}/parts",
                                   json={"part_no": part_no}), 201)
        second = _ok(await eng.post(f"/api/v1/tickets/{t['id']}/parts",
                                    json={"part_no": part_no}), 201)
        assert (first["state"], first["depot"]) == ("reserved", "shanghai")
        assert (second["state"], second["depot"]) == ("backorder", None)
        stock = _ok(await eng.get("/api/v1/parts", params={"series": "EMU-BS"}))
        assert {p["part_no"]: p["stock"] for p in stock}[part_no] == {"shanghai": 0}
        detail = _ok(await eng.get(f"/api/v1/tickets/{t['id']}"))
        assert [e["kind"] for e in detail["events"] if e["kind"].startswith("part")] == [
            "part_reserved", "part_out_of_stock"]
        assert (await eng.post(f"/api/v1/tickets/{t['id']}/parts",
                               json={"part_no": "nope"})).status_code == 404
    async with db.session() as s:
        notes = (await s.exec(select(SlaNotification).where(
            SlaNotification.ticket_id == t["id"]))).all()
    assert [(n.level, n.recipient, n.payload["event"]) for n in notes] == [
        ("lead", "lead@vendor.example", "part_out_of_stock")]


async def test_sla_report_and_contracts_over_the_api(world: World) -> None:
    async with client_for(world.app, world.admin_token) as admin, \
            client_for(world.app, world.own.token) as own:
        _ok(await admin.put(f"/api/v1/sla/contracts/{world.other.org_id}", json={
            "terms": {"classes": {"A": {"resolution": 1800}}}}))
        assert _ok(await admin.get(f"/api/v1/sla/contracts/{world.other.org_id}"))["terms"] == {
            "classes": {"A": {"resolution": 1800}}}
        bad = await admin.put(f"/api/v1/sla/contracts/{world.other.org_id}", json={
            "terms": {"classes": {"A": {"resolution": -1}}}})
        assert bad.status_code == 422
        assert (await own.put(f"/api/v1/sla/contracts/{world.own.org_id}",
                              json={"terms": {}})).status_code == 403
        _ok(await own.post("/api/v1/tickets", json={
            "site_id": world.own.site_id, "title": "x", "fault_class": "D"}), 201)
        month = world.clock.now.strftime("%Y-%m")
        mine = _ok(await own.get("/api/v1/sla/report", params={"month": month}))
        assert {r["customer"] for r in mine["rows"]} == {f"org-{world.own.marker}", "*"}
        csv = await admin.get("/api/v1/sla/report", params={"month": month, "format": "csv"})
        assert csv.status_code == 200
        assert csv.headers["content-type"].startswith("text/csv")
        assert csv.text.startswith("month,customer,fault_class,tickets")
        assert (await admin.get("/api/v1/sla/report",
                                params={"month": "2026-13"})).status_code == 422
