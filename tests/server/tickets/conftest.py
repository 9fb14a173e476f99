"""A fresh organisation and site per test (the database is shared by the session)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from server.core.db import Database
from server.models import Organisation, Site, Unit


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
                   units: tuple[str, ...] = (), series: str = "EMU-BS") -> SiteRef:
        tag = uuid.uuid4().hex[:8]
        async with db.session() as s:
            org = Organisation(name=f"tickets-{tag}")
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
