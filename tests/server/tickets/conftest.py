"""A fresh organisation and site per test (the database is shared by the session)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server.core.db import Database, migrate_sync
from server.models import Organisation, Site, Unit
from tests.support.database import fresh_database


@dataclass(frozen=True)
class SiteRef:
    """A stored site's keys (ids are ints here, not Optional)."""

    id: int
    org_id: int
    code: str
    timezone: str


MakeSite = Callable[..., Awaitable[SiteRef]]


def pk(row: Any) -> int:
    """A stored row's id."""
    assert row.id is not None
    return int(row.id)


@pytest.fixture
def make_site(db: Database) -> MakeSite:
    """Create an organisation with one site (zone, policy, units by device name)."""
    return site_factory(db)


def site_factory(db: Database) -> MakeSite:
    """`make_site` on any database."""

    async def make(timezone: str = "UTC", policy: dict[str, object] | None = None,
                   units: tuple[str, ...] = (), series: str = "EMU-BS",
                   org_name: str | None = None) -> SiteRef:
        tag = uuid.uuid4().hex[:8]
        async with db.session() as s:
            org = Organisation(name=org_name or f"tickets-{tag}")
            s.add(org)
            await s.flush()
            assert org.id is not None
            site = Site(code=f"site-{tag}", name=f"Site {tag}", org_id=org.id,
                        timezone=timezone, policy=policy or {})
            s.add(site)
            await s.flush()
            assert site.id is not None
            for device in units:
                s.add(Unit(site_id=site.id, device=device, series=series))
        return SiteRef(site.id, org.id, site.code, timezone)

    return make


@pytest.fixture
def own_db_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A database of this test alone: the shared one holds other tests' due timers, which a
    scheduler on the real clock would rightly fire (and notify)."""
    with fresh_database(database_url, tmp_path) as url:
        migrate_sync(url)
        yield url


@pytest.fixture
async def own_db(own_db_url: str) -> AsyncIterator[Database]:
    """The server's engine on that database."""
    database = Database(own_db_url)
    yield database
    await database.close()


@pytest.fixture
def own_site(own_db: Database) -> MakeSite:
    """Sites in that database."""
    return site_factory(own_db)
