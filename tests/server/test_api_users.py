"""Users (admin) and tokens (everyone's own): create, list, issue, revoke."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest

from server.core.db import Database
from tests.server.test_api_common import NOW, World, client_for, seed_world


@pytest.fixture
async def world(db: Database) -> World:
    """A freshly seeded world."""
    return await seed_world(db)


async def test_admin_creates_customer_and_issues_first_token(world: World) -> None:
    name = f"cust-{secrets.token_hex(4)}"
    async with client_for(world.app, world.admin_token) as admin:
        created = await admin.post("/api/v1/users", json={
            "name": name, "role": "customer", "org_id": world.own.org_id,
            "email": "ops@example.com"})
        assert created.status_code == 201, created.text
        user = created.json()
        assert (await admin.post("/api/v1/users", json={
            "name": name, "role": "engineer"})).status_code == 409
        issued = await admin.post(f"/api/v1/users/{user['id']}/tokens",
                                  json={"name": "first", "expires_in_days": 1})
        assert issued.status_code == 201
        token = issued.json()
        assert token["expires_at"].startswith((NOW + timedelta(days=1)).isoformat()[:19])
        listed = (await admin.get(f"/api/v1/users/{user['id']}/tokens")).json()
        assert [t["id"] for t in listed["data"]] == [token["id"]]
        assert "token" not in listed["data"][0]
        by_org = (await admin.get("/api/v1/users", params={
            "org_id": world.own.org_id, "role": "customer"})).json()
        assert {u["name"] for u in by_org["data"]} == {name, f"cust-{world.own.marker}"}
    async with client_for(world.app, token["token"]) as customer:
        me = (await customer.get("/api/v1/users/me")).json()
        sites = (await customer.get("/api/v1/sites")).json()
    assert me["name"] == name
    assert [s["id"] for s in sites["data"]] == [world.own.site_id]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"role": "customer"}, "org_id"),
        ({"role": "customer", "org_id": 2_000_000_000}, "does not exist"),
        ({"role": "king"}, "role"),
        ({"role": "engineer", "email": "not-an-address"}, "email"),
        ({"role": "engineer", "password": "x"}, "unknown field"),
    ],
)
async def test_user_create_refuses_bad_input(
    world: World, body: dict[str, object], fragment: str
) -> None:
    async with client_for(world.app, world.admin_token) as admin:
        response = await admin.post("/api/v1/users",
                                    json={"name": f"u-{secrets.token_hex(4)}", **body})
    assert response.status_code == 422
    assert fragment in response.json()["detail"]


async def test_admin_updates_and_deletes_user(world: World) -> None:
    async with client_for(world.app, world.admin_token) as admin:
        user = (await admin.post("/api/v1/users", json={
            "name": f"e-{secrets.token_hex(4)}", "role": "engineer"})).json()
        token = (await admin.post(f"/api/v1/users/{user['id']}/tokens", json={})).json()
        moved = await admin.patch(f"/api/v1/users/{user['id']}",
                                  json={"role": "customer", "org_id": world.other.org_id})
        assert moved.status_code == 200
        assert moved.json()["org_id"] == world.other.org_id
        orphan = await admin.patch(f"/api/v1/users/{user['id']}", json={"org_id": None})
        assert orphan.status_code == 422
        assert (await admin.delete(f"/api/v1/users/{user['id']}")).status_code == 204
        assert (await admin.get(f"/api/v1/users/{user['id']}")).status_code == 404
    async with client_for(world.app, token["token"]) as gone:
        assert (await gone.get("/api/v1/users/me")).status_code == 401


async def test_admin_cannot_demote_or_delete_itself(world: World) -> None:
    async with client_for(world.app, world.admin_token) as admin:
        demote = await admin.patch(f"/api/v1/users/{world.admin_id}", json={"role": "engineer"})
        delete = await admin.delete(f"/api/v1/users/{world.admin_id}")
    assert demote.status_code == 409
    assert delete.status_code == 409


async def test_own_tokens_create_list_revoke(world: World) -> None:
    async with client_for(world.app, world.own.token) as client:
        created = await client.post("/api/v1/users/me/tokens",
                                    json={"name": "script", "expires_in_days": None})
        assert created.status_code == 201
        new = created.json()
        assert new["expires_at"] is None
        assert new["token"] != world.own.token
        listed = (await client.get("/api/v1/users/me/tokens")).json()
        assert {t["id"] for t in listed["data"]} == {world.own.token_id, new["id"]}
        other = await client.delete(f"/api/v1/users/me/tokens/{world.other.token_id}")
        assert other.status_code == 404
    async with client_for(world.app, new["token"]) as script:
        assert (await script.get("/api/v1/users/me")).status_code == 200
        revoked = await script.delete(f"/api/v1/users/me/tokens/{new['id']}")
        assert revoked.status_code == 204
        assert (await script.get("/api/v1/users/me")).status_code == 401
    async with client_for(world.app, world.own.token) as client:
        assert (await client.get("/api/v1/users/me")).status_code == 200


async def test_token_lifetime_is_bounded(world: World) -> None:
    async with client_for(world.app, world.own.token) as client:
        for days in (0, -1, 100_000):
            response = await client.post("/api/v1/users/me/tokens",
                                         json={"expires_in_days": days})
            assert response.status_code == 422
