"""Organisations, sites, units, agents, faults and events: CRUD, filters, pagination."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import pytest

from server.core.db import Database
from tests.server.test_api_common import NOW, World, client_for, seed_world


@pytest.fixture
async def world(db: Database) -> World:
    """A freshly seeded world."""
    return await seed_world(db)


def ids(page: dict[str, Any]) -> list[int]:
    """The ids on a page."""
    return [row["id"] for row in page["data"]]


# --- organisations -------------------------------------------------------------------------


async def test_organisation_crud(world: World) -> None:
    name = f"Acme {secrets.token_hex(4)}"
    async with client_for(world.app, world.admin_token) as client:
        created = await client.post("/api/v1/organisations", json={"name": name})
        assert created.status_code == 201
        org = created.json()
        assert org["kind"] == "customer"
        dup = await client.post("/api/v1/organisations", json={"name": name})
        assert dup.status_code == 409
        renamed = await client.patch(f"/api/v1/organisations/{org['id']}",
                                     json={"name": name + " GmbH", "kind": "partner"})
        assert renamed.json()["name"] == name + " GmbH"
        assert renamed.json()["kind"] == "partner"
        got = await client.get(f"/api/v1/organisations/{org['id']}")
        assert got.json() == renamed.json()
        listed = await client.get("/api/v1/organisations", params={"name": name + " GmbH"})
        assert ids(listed.json()) == [org["id"]]
        assert (await client.delete(f"/api/v1/organisations/{org['id']}")).status_code == 204
        assert (await client.get(f"/api/v1/organisations/{org['id']}")).status_code == 404


async def test_organisation_in_use_cannot_be_deleted(world: World) -> None:
    async with client_for(world.app, world.admin_token) as client:
        response = await client.delete(f"/api/v1/organisations/{world.own.org_id}")
    assert response.status_code == 409
    assert "site" in response.json()["detail"]


async def test_customer_sees_only_its_organisation(world: World) -> None:
    async with client_for(world.app, world.own.token) as client:
        page = (await client.get("/api/v1/organisations")).json()
        other = await client.get(f"/api/v1/organisations/{world.other.org_id}")
    assert ids(page) == [world.own.org_id]
    assert other.status_code == 404


# --- sites ---------------------------------------------------------------------------------


async def test_site_create_update_and_read(world: World) -> None:
    code = f"new-{secrets.token_hex(4)}"
    body = {"code": code, "name": "New site", "org_id": world.own.org_id,
            "timezone": "Asia/Shanghai", "policy": {"technician_may_approve": True}}
    async with client_for(world.app, world.admin_token) as admin:
        created = await admin.post("/api/v1/sites", json=body)
        assert created.status_code == 201, created.text
        site = created.json()
        assert site["timezone"] == "Asia/Shanghai"
        assert site["policy"] == {"technician_may_approve": True}
        assert (await admin.post("/api/v1/sites", json=body)).status_code == 409
        changed = await admin.patch(f"/api/v1/sites/{site['id']}",
                                    json={"timezone": "America/New_York", "name": "Renamed"})
        assert changed.status_code == 200
        assert changed.json()["timezone"] == "America/New_York"
        assert changed.json()["code"] == code
    async with client_for(world.app, world.own.token) as customer:
        by_code = (await customer.get("/api/v1/sites", params={"code": code})).json()
    assert ids(by_code) == [site["id"]]


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"timezone": "Mars/Olympus"}, "time zone"),
        ({"timezone": "../../etc/passwd"}, "time zone"),
        ({"code": "a/b+c"}, "code"),
        ({"code": ""}, "code"),
        ({"org_id": 2_000_000_000}, "organisation"),
        ({"name": ""}, "name"),
        ({"policy": {"k": "nul\u0000"}}, "NUL"),
        ({"colour": "red"}, "unknown field"),
    ],
)
async def test_site_create_refuses_bad_fields(
    world: World, patch: dict[str, Any], fragment: str
) -> None:
    body = {"code": f"bad-{secrets.token_hex(4)}", "name": "x", "org_id": world.own.org_id,
            **patch}
    async with client_for(world.app, world.admin_token) as client:
        response = await client.post("/api/v1/sites", json=body)
    assert response.status_code == 422
    assert fragment in response.json()["detail"]


async def test_site_lists_filter_by_org_and_page(world: World) -> None:
    async with client_for(world.app, world.admin_token) as client:
        own = (await client.get("/api/v1/sites", params={"org_id": world.own.org_id})).json()
        first = (await client.get("/api/v1/sites", params={"limit": 1})).json()
        second = (await client.get("/api/v1/sites", params={"limit": 1, "offset": 1})).json()
    assert ids(own) == [world.own.site_id]
    assert own["count"] == 1
    assert first["count"] >= 2
    assert first["limit"] == 1
    assert second["offset"] == 1
    assert ids(first) != ids(second)


# --- units and agents ----------------------------------------------------------------------


async def test_units_by_site(world: World) -> None:
    async with client_for(world.app, world.engineer_token) as client:
        by_id = (await client.get("/api/v1/units", params={"site_id": world.own.site_id})).json()
        by_code = (await client.get("/api/v1/units",
                                    params={"site": world.own.site_code})).json()
        unit = (await client.get(f"/api/v1/units/{world.own.unit_id}")).json()
    assert ids(by_id) == ids(by_code) == [world.own.unit_id]
    assert unit["device"] == f"emu-{world.own.marker}"
    assert unit["serial"] == f"SN-{world.own.marker}"


async def test_agents_hide_credentials(world: World) -> None:
    async with client_for(world.app, world.engineer_token) as client:
        page = (await client.get("/api/v1/agents", params={"site_id": world.own.site_id})).json()
        agent = (await client.get(f"/api/v1/agents/{world.own.agent_id}")).json()
    assert ids(page) == [world.own.agent_id]
    assert agent["online"] is True
    assert not {"mqtt_password_hash", "enrolment_token_hash", "mqtt_username"} & agent.keys()


# --- faults and events ---------------------------------------------------------------------


async def faults(world: World, token: str, **params: Any) -> dict[str, Any]:
    """GET /faults with `params`, asserting 200."""
    async with client_for(world.app, token) as client:
        response = await client.get("/api/v1/faults", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def test_fault_filters(world: World) -> None:
    mine = {"site_id": world.own.site_id}
    a, b, c, d, a2 = world.own.fault_ids
    token = world.engineer_token
    assert ids(await faults(world, token, **mine)) == [a2, d, c, b, a]  # newest first
    assert ids(await faults(world, token, **mine, **{"class": "A"})) == [a2, a]
    assert ids(await faults(world, token, **mine, **{"class": ["A", "B"]}, state="open")) == [b, a]
    assert ids(await faults(world, token, **mine, state="cleared")) == [a2, c]
    assert ids(await faults(world, token, site=world.own.site_code, state="open")) == [d, b, a]
    assert ids(await faults(world, token, unit_id=world.own.unit_id, **{"class": "D"})) == [d]
    window = {"since": (NOW - timedelta(minutes=45)).isoformat(),
              "until": (NOW - timedelta(minutes=15)).isoformat()}
    assert ids(await faults(world, token, **mine, **window)) == [d, c, b]
    naive = {"since": (NOW - timedelta(minutes=45)).replace(tzinfo=None).isoformat()}
    assert ids(await faults(world, token, **mine, **naive)) == [a2, d, c, b]


async def test_fault_pagination(world: World) -> None:
    mine = {"site_id": world.own.site_id, "limit": 2}
    pages = [await faults(world, world.admin_token, **mine, offset=o) for o in (0, 2, 4, 6)]
    assert [p["count"] for p in pages] == [5, 5, 5, 5]
    assert [len(p["data"]) for p in pages] == [2, 2, 1, 0]
    seen = [i for p in pages for i in ids(p)]
    assert sorted(seen) == sorted(world.own.fault_ids)


async def test_fault_get_carries_evidence(world: World) -> None:
    async with client_for(world.app, world.own.token) as client:
        fault = (await client.get(f"/api/v1/faults/{world.own.fault_ids[0]}")).json()
    assert fault["fault_class"] == "A"
    assert fault["evidence"] == {"marker": world.own.marker}


async def test_events_by_site_and_unit(world: World) -> None:
    async with client_for(world.app, world.engineer_token) as client:
        by_site = (await client.get("/api/v1/events",
                                    params={"site_id": world.own.site_id})).json()
        by_unit = (await client.get("/api/v1/events", params={
            "unit_id": world.own.unit_id, "kind": "alarm_raised"})).json()
        none = (await client.get("/api/v1/events", params={
            "unit_id": world.own.unit_id, "since": NOW.isoformat()})).json()
        event = (await client.get(f"/api/v1/events/{world.own.event_id}")).json()
    assert ids(by_site) == ids(by_unit) == [world.own.event_id]
    assert none["count"] == 0
    assert event["code"] == f"ev-{world.own.marker}"
