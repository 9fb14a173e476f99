"""Bearer tokens (missing, bad, expired, revoked), `last_used`, roles, and the bootstrap admin."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from server.core.db import Database, migrate
from server.core.security import LAST_USED_RESOLUTION, ensure_admin, hash_token
from server.models import ApiToken, User
from tests.server.test_api_common import NOW, World, add_user, client_for, seed_world
from tests.support.database import fresh_database


@pytest.fixture
async def world(db: Database) -> World:
    """A freshly seeded world."""
    return await seed_world(db)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-real-token"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "token-without-scheme"},
    ],
)
async def test_missing_or_bad_token_is_401(world: World, headers: dict[str, str]) -> None:
    async with client_for(world.app) as client:
        response = await client.get("/api/v1/sites", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"]


async def test_expired_token_is_401(db: Database, world: World) -> None:
    async with db.session() as session:
        _, token, _ = await add_user(session, f"late-{world.own.marker}", "engineer",
                                     expires_at=NOW - timedelta(seconds=1))
    async with client_for(world.app, token) as client:
        response = await client.get("/api/v1/users/me")
    assert response.status_code == 401
    assert response.json()["detail"] == "token expired"


async def test_token_valid_until_expiry(db: Database, world: World) -> None:
    async with db.session() as session:
        _, token, _ = await add_user(session, f"soon-{world.own.marker}", "engineer",
                                     expires_at=NOW + timedelta(minutes=5))
    async with client_for(world.app, token) as client:
        assert (await client.get("/api/v1/users/me")).status_code == 200
        world.clock.now = NOW + timedelta(minutes=5)
        assert (await client.get("/api/v1/users/me")).status_code == 401


async def test_last_used_is_recorded_and_throttled(db: Database, world: World) -> None:
    async def last_used() -> object:
        async with db.session() as session:
            row = (await session.exec(select(ApiToken).where(
                ApiToken.id == world.own.token_id))).one()
            return row.last_used

    async with client_for(world.app, world.own.token) as client:
        await client.get("/api/v1/users/me")
        assert await last_used() == NOW
        world.clock.now = NOW + LAST_USED_RESOLUTION / 2
        await client.get("/api/v1/users/me")
        assert await last_used() == NOW
        world.clock.now = NOW + LAST_USED_RESOLUTION
        await client.get("/api/v1/users/me")
        assert await last_used() == NOW + LAST_USED_RESOLUTION


async def test_me_tells_who_is_calling(world: World) -> None:
    async with client_for(world.app, world.own.token) as client:
        me = (await client.get("/api/v1/users/me")).json()
    assert me["id"] == world.own.user_id
    assert me["role"] == "customer"
    assert me["org_id"] == world.own.org_id


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/organisations", {"name": "x"}),
        ("POST", "/api/v1/sites", {"code": "x", "name": "x", "org_id": 1}),
        ("POST", "/api/v1/users", {"name": "x", "role": "admin"}),
        ("GET", "/api/v1/users", None),
    ],
)
@pytest.mark.parametrize("who", ["customer", "engineer"])
async def test_admin_only_routes_are_403_for_others(
    world: World, who: str, method: str, path: str, body: dict[str, object] | None
) -> None:
    token = world.own.token if who == "customer" else world.engineer_token
    async with client_for(world.app, token) as client:
        response = await client.request(method, path, json=body)
    assert response.status_code == 403
    assert "admin" in response.json()["detail"]


async def test_engineer_reads_every_site(world: World) -> None:
    async with client_for(world.app, world.engineer_token) as client:
        for site_id in (world.own.site_id, world.other.site_id):
            assert (await client.get(f"/api/v1/sites/{site_id}")).status_code == 200


async def test_customer_without_organisation_sees_nothing(db: Database, world: World) -> None:
    async with db.session() as session:
        _, token, _ = await add_user(session, f"orphan-{world.own.marker}", "customer")
    async with client_for(world.app, token) as client:
        sites = (await client.get("/api/v1/sites")).json()
        fault = await client.get(f"/api/v1/faults/{world.own.fault_ids[0]}")
    assert sites["count"] == 0
    assert fault.status_code == 404


async def test_unknown_role_in_database_is_refused(db: Database, world: World) -> None:
    async with db.session() as session:
        _, token, _ = await add_user(session, f"odd-{world.own.marker}", "superuser")
    async with client_for(world.app, token) as client:
        assert (await client.get("/api/v1/users/me")).status_code == 401


async def test_ensure_admin_bootstraps_once(database_url: str, tmp_path: Path) -> None:
    with fresh_database(database_url, tmp_path) as url:
        await migrate(url)
        fresh = Database(url)
        try:
            assert await ensure_admin(fresh, "first-token-" + "x" * 20) is True
            assert await ensure_admin(fresh, "second-token-" + "y" * 20) is False
            async with fresh.session() as session:
                admins = (await session.exec(select(User).where(User.role == "admin"))).all()
                tokens = (await session.exec(select(ApiToken))).all()
            assert [a.name for a in admins] == ["admin"]
            assert [t.token_hash for t in tokens] == [hash_token("first-token-" + "x" * 20)]
        finally:
            await fresh.close()


async def test_lifespan_creates_admin_with_configured_token(
    database_url: str, tmp_path: Path
) -> None:
    from server.app import create_app
    from tests.server.test_api_common import settings_for

    with fresh_database(database_url, tmp_path) as url:
        await migrate(url)
        fresh = Database(url)
        try:
            token = "bootstrap-" + "z" * 30
            settings = settings_for(fresh).model_copy(update={"admin_token": token})
            app = create_app(settings, fresh)
            async with app.router.lifespan_context(app), client_for(app, token) as client:
                me = (await client.get("/api/v1/users/me")).json()
            assert me["name"] == "admin"
            assert me["role"] == "admin"
        finally:
            await fresh.close()
