"""The API's shared test world, and the operational endpoints (`/healthz`, `/metrics`, OpenAPI).

`seed_world` builds two customer organisations ("own" and "other") with a site, an agent, a
unit with telemetry and rollups, faults and an event each, plus admin, engineer and customer
users with tokens. Every text of an organisation's objects carries its `marker`, so a test
can tell whether anything of the other organisation leaked into an answer. Names are unique
per call: the database is shared by the whole test session.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel.ext.asyncio.session import AsyncSession

from server.app import create_app
from server.core.config import ServerSettings
from server.core.db import Database
from server.core.security import hash_token, new_token
from server.models import (
    Agent,
    ApiToken,
    Event,
    Fault,
    Organisation,
    Rollup,
    Series,
    Site,
    Telemetry,
    Unit,
    User,
)
from server.tickets import service as tickets
from server.tickets.models import Part
from tests.support.commissioning_site import seed_plan
from tests.support.net import free_tcp_port
from tests.support.upgrades_seed import seed_upgrade_plan

NOW = datetime(2031, 3, 14, 12, 0, tzinfo=UTC)
"""The injected clock's time: seeded data lies in the hour before it."""

RAW_COUNT = 60
RAW_STEP = timedelta(seconds=10)
RAW_START = NOW - timedelta(minutes=30)
ROLLUP_COUNT = 10
POINT = "soc"


class Clock:
    """A settable clock for `create_app(clock=...)`."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        """The current (test) time."""
        return self.now


@dataclass
class OrgWorld:
    """One customer organisation with one of everything; `marker` is in all its texts."""

    marker: str
    org_id: int
    site_id: int
    site_code: str
    agent_id: int
    unit_id: int
    series_id: int
    fault_ids: list[int]
    event_id: int
    user_id: int
    token: str
    token_id: int
    ticket_id: int = 0
    link_id: int = 0
    session_id: str = ""
    recording_id: int = 0
    plan_id: int = 0
    upgrade_plan_id: int = 0
    release_id: int = 0


@dataclass
class World:
    """Two organisations, staff tokens, and the app under test."""

    own: OrgWorld
    other: OrgWorld
    admin_token: str
    admin_id: int
    engineer_token: str
    clock: Clock
    app: FastAPI
    extra: dict[str, int] = field(default_factory=dict)
    engineer_id: int = 0


def settings_for(db: Database) -> ServerSettings:
    """Settings for an API-only app on the test database."""
    return ServerSettings(
        database_url=db.url, secret_key=secrets.token_hex(16), roles=("api",),
    )


async def add_user(
    session: AsyncSession, name: str, role: str, org_id: int | None = None,
    expires_at: datetime | None = None,
) -> tuple[int, str, int]:
    """A user with one token: (user id, token, token id)."""
    user = User(name=name, role=role, org_id=org_id)
    session.add(user)
    await session.flush()
    assert user.id is not None
    token = new_token()
    row = ApiToken(user_id=user.id, token_hash=hash_token(token), name=f"t-{name}",
                   expires_at=expires_at, created_at=NOW - timedelta(days=1))
    session.add(row)
    await session.flush()
    assert row.id is not None
    return user.id, token, row.id


async def _seed_remote_session(session: AsyncSession, site_id: int, ticket_id: int,
                               user_id: int, marker: str) -> tuple[str, int]:
    """A remote session of the ticket, its audit entry and a recording, all marked."""
    from server.sessions.models import RemoteSession, SessionAudit, SessionRecording

    sid = "s" + secrets.token_hex(6)
    session.add(RemoteSession(id=sid, ticket_id=ticket_id, site_id=site_id, engineer_id=user_id,
                              reason=f"reason {marker}", scope={"shell": True, "units": []},
                              max_duration_s=600, requested_at=NOW))
    await session.flush()
    session.add(SessionAudit(session_id=sid, seq=1, ts=NOW, kind="requested",
                             detail={"marker": marker}, prev_hash="0" * 64, hash="0" * 64))
    recording = SessionRecording(session_id=sid, name=f"shell-{marker}.cast", started_at=NOW,
                                 ended_at=NOW, sha256="0" * 64, cast=f'{{"version": 2}}\n{marker}')
    session.add(recording)
    await session.flush()
    assert recording.id is not None
    return sid, recording.id


async def _seed_org(session: AsyncSession, label: str) -> OrgWorld:
    marker = f"{label}-{secrets.token_hex(4)}"
    org = Organisation(name=f"org-{marker}")
    session.add(org)
    await session.flush()
    assert org.id is not None
    site = Site(code=f"site-{marker}", name=f"Site {marker}", org_id=org.id,
                timezone="Europe/Berlin", policy={"note": marker})
    session.add(site)
    await session.flush()
    assert site.id is not None
    agent = Agent(agent_id=f"agent-{marker}", site_id=site.id, online=True, version=marker)
    unit = Unit(site_id=site.id, device=f"emu-{marker}", serial=f"SN-{marker}", model="EMU-50")
    session.add_all([agent, unit])
    await session.flush()
    assert agent.id is not None
    assert unit.id is not None
    series = Series(unit_id=unit.id, point=POINT)
    other_series = Series(unit_id=unit.id, point=f"note-{marker}")
    session.add_all([series, other_series])
    await session.flush()
    assert series.id is not None
    assert other_series.id is not None
    session.add_all(
        Telemetry(series_id=series.id, ts=RAW_START + i * RAW_STEP, value=float(i),
                  quality=0 if i % 10 else 1)
        for i in range(RAW_COUNT)
    )
    session.add(Telemetry(series_id=other_series.id, ts=RAW_START, text=marker, quality=0))
    session.add_all(
        Rollup(series_id=series.id, width_s=60, bucket=RAW_START + timedelta(minutes=i),
               min=float(i), max=float(i + 5), sum=float(6 * i + 15), count=6)
        for i in range(ROLLUP_COUNT)
    )
    session.add(Rollup(series_id=series.id, width_s=3600,
                       bucket=NOW - timedelta(hours=1), min=0.0, max=59.0, sum=1770.0, count=60))
    faults = [
        Fault(site_id=site.id, unit_id=unit.id, code=f"{cls}-{marker}", fault_class=cls,
              title=f"fault {cls} {marker}", state=state, opened_at=NOW - timedelta(minutes=m),
              last_seen_at=NOW - timedelta(minutes=m), evidence={"marker": marker},
              cleared_at=NOW if state == "cleared" else None)
        for cls, state, m in (("A", "open", 50), ("B", "open", 40), ("C", "cleared", 30),
                              ("D", "open", 20), ("A", "cleared", 10))
    ]
    event = Event(site_id=site.id, unit_id=unit.id, ts=NOW - timedelta(minutes=5),
                  kind="alarm_raised", code=f"ev-{marker}", detail={"marker": marker})
    session.add_all([*faults, event])
    await session.flush()
    user_id, token, token_id = await add_user(session, f"cust-{marker}", "customer", org.id)
    ticket = await tickets.open_ticket(session, site_id=site.id, source="portal",
                                       title=f"ticket {marker}", fault_class="B",
                                       now=NOW - timedelta(minutes=15))
    link = await tickets.link(session, tickets.require_id(ticket.id), "release",
                              f"EMU-BS/{marker}", now=NOW - timedelta(minutes=14))
    session_id, recording_id = await _seed_remote_session(
        session, site.id, tickets.require_id(ticket.id), user_id, marker)
    session.add(Part(part_no=f"part-{marker}", series="EMU-BS", name=f"part {marker}"))
    return OrgWorld(
        session_id=session_id, recording_id=recording_id,
        marker=marker, org_id=org.id, site_id=site.id, site_code=site.code, agent_id=agent.id,
        unit_id=unit.id, series_id=series.id, fault_ids=[f.id for f in faults if f.id],
        event_id=event.id or 0, user_id=user_id, token=token, token_id=token_id,
        ticket_id=tickets.require_id(ticket.id), link_id=tickets.require_id(link.id),
        plan_id=await seed_plan(session, site.id, marker, NOW - timedelta(minutes=12)),
        **dict(zip(("upgrade_plan_id", "release_id"), await seed_upgrade_plan(
            session, org.id, site.id, unit.id, marker, NOW - timedelta(minutes=11)),
            strict=True)),
    )


async def seed_world(db: Database) -> World:
    """Two organisations' worth of data, staff users, and an app with a fixed clock."""
    async with db.session() as session:
        own = await _seed_org(session, "own")
        other = await _seed_org(session, "other")
        tag = secrets.token_hex(4)
        admin_id, admin_token, _ = await add_user(session, f"admin-{tag}", "admin")
        engineer_id, engineer_token, _ = await add_user(session, f"eng-{tag}", "engineer")
    clock = Clock()
    app = create_app(settings_for(db), db, clock=clock)
    return World(own=own, other=other, admin_token=admin_token, admin_id=admin_id,
                 engineer_token=engineer_token, clock=clock, app=app, engineer_id=engineer_id)


@asynccontextmanager
async def client_for(app: FastAPI, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app without a socket, authenticated with `token` if given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://emu.test",
                                 headers=headers) as client:
        yield client


@pytest.fixture
async def world(db: Database) -> World:
    """A freshly seeded world on the session's database."""
    return await seed_world(db)


# --- operational endpoints -----------------------------------------------------------------


async def test_healthz_ok(world: World) -> None:
    async with client_for(world.app) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_healthz_unavailable_without_database() -> None:
    # a closed port rather than a bad SQLite path: aiosqlite's worker thread could outlive
    # the test's event loop and report into it after it closed
    broken = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_tcp_port()}/none")
    try:
        app = create_app(settings_for(broken), broken)
        async with client_for(app) as client:
            response = await client.get("/healthz")
    finally:
        await broken.close()
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"


async def test_metrics_counts_requests(world: World) -> None:
    async with client_for(world.app, world.admin_token) as client:
        await client.get("/api/v1/sites")
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'emu_http_requests_total{method="GET",status="200"}' in response.text


async def test_openapi_lists_every_resource(world: World) -> None:
    async with client_for(world.app) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for resource in ("sites", "units", "faults", "events", "agents", "users", "organisations"):
        assert f"/api/v1/{resource}" in paths
    assert "/api/v1/units/{unit_id}/telemetry" in paths
    schemes = response.json()["components"]["securitySchemes"]
    assert any(s.get("scheme") == "bearer" for s in schemes.values())


async def test_unexpected_error_is_logged_json_500(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    @world.app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    with caplog.at_level(logging.ERROR, logger="server.api.errors"):
        async with client_for(world.app) as client:
            response = await client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "kaboom" not in response.text
    assert any("unhandled error on GET /boom" in r.getMessage() for r in caplog.records)


async def test_unknown_route_is_json_404(world: World) -> None:
    async with client_for(world.app, world.admin_token) as client:
        response = await client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert "detail" in response.json()
