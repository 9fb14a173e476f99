"""What the fleet, site and fault pages show, read with the caller's scope.

Every query here carries `visible_sites(user, ...)` (server/core/security.py), the same clause
the API uses, so a customer's page can only ever list its own organisation's sites.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.core.security import visible_sites
from server.errors import NotFound
from server.models import Agent, Fault, Organisation, Rollup, Series, Site, Telemetry, Unit, User
from server.web.charts import Sample

KEY_POINTS = (".Status", ".W", ".SoC", ".IntTmp")
"""Suffixes of the points a unit row shows (status, power, state of charge, temperature)."""

MAX_FAULTS_PAGE = 1000


@dataclass
class SiteSummary:
    """One row of the fleet page."""

    site: Site
    org: str
    online: bool
    last_seen: datetime | None
    units: int
    faults: dict[str, int] = field(default_factory=dict)

    @property
    def state(self) -> str:
        """`offline`, `fault` (an A/B fault open), `warning` (C/D open) or `online`."""
        if not self.online:
            return "offline"
        if self.faults.get("A") or self.faults.get("B"):
            return "fault"
        if self.faults:
            return "warning"
        return "online"


async def fleet(session: AsyncSession, user: User) -> list[SiteSummary]:
    """Every visible site with its agents' state, unit count and open faults by class."""
    rows = (await session.exec(
        select(Site, Organisation.name)
        .join(Organisation, col(Organisation.id) == col(Site.org_id))
        .where(visible_sites(user, col(Site.id)))
        .order_by(col(Site.name))
    )).all()
    agents = (await session.exec(
        select(Agent.site_id, func.max(sa.cast(col(Agent.online), sa.Integer)),
               func.max(Agent.last_seen))
        .where(visible_sites(user, col(Agent.site_id)))
        .group_by(col(Agent.site_id))
    )).all()
    units = dict((await session.exec(
        select(Unit.site_id, func.count()).where(visible_sites(user, col(Unit.site_id)))
        .group_by(col(Unit.site_id))
    )).all())
    faults: dict[int, dict[str, int]] = defaultdict(dict)
    for site_id, cls, n in (await session.exec(
        select(Fault.site_id, Fault.fault_class, func.count())
        .where(Fault.state == "open", visible_sites(user, col(Fault.site_id)))
        .group_by(col(Fault.site_id), col(Fault.fault_class))
    )).all():
        faults[site_id][cls] = n
    state = {site_id: (bool(online), seen) for site_id, online, seen in agents}
    out = []
    for site, org in rows:
        sid = site.id or 0
        online, seen = state.get(sid, (False, None))
        out.append(SiteSummary(site, org, online, seen, units.get(sid, 0),
                               dict(sorted(faults.get(sid, {}).items()))))
    return out


async def visible_site(session: AsyncSession, user: User, code: str) -> Site:
    """The site with `code` if `user` may see it, else NotFound (existence is not leaked)."""
    site = (await session.exec(
        select(Site).where(Site.code == code, visible_sites(user, col(Site.id)))
    )).first()
    if site is None:
        raise NotFound(f"site {code!r} not found")
    return site


@dataclass(frozen=True)
class FaultRow:
    """A fault with the names a list shows."""

    fault: Fault
    site_code: str
    site_name: str
    device: str


async def faults(
    session: AsyncSession, user: User, *, state: str | None = "open",
    classes: tuple[str, ...] = (), site_id: int | None = None, limit: int = MAX_FAULTS_PAGE,
    offset: int = 0, fault_id: int | None = None,
) -> tuple[list[FaultRow], int]:
    """Faults the user may see (newest first, A before D at equal time) and how many match."""
    where = [visible_sites(user, col(Fault.site_id))]
    if state:
        where.append(col(Fault.state) == state)
    if classes:
        where.append(col(Fault.fault_class).in_(classes))
    if site_id is not None:
        where.append(col(Fault.site_id) == site_id)
    if fault_id is not None:
        where.append(col(Fault.id) == fault_id)
    total = (await session.exec(select(func.count()).select_from(Fault).where(*where))).one()
    rows = (await session.exec(
        select(Fault, Site.code, Site.name, Unit.device)
        .join(Site, col(Site.id) == col(Fault.site_id))
        .join(Unit, col(Unit.id) == col(Fault.unit_id))
        .where(*where)
        .order_by(col(Fault.opened_at).desc(), col(Fault.id).desc())
        .limit(limit).offset(offset)
    )).all()
    return [FaultRow(f, code, name, device) for f, code, name, device in rows], int(total)


async def fault_counts(session: AsyncSession, user: User) -> dict[str, int]:
    """Open faults per class over the visible fleet."""
    rows = (await session.exec(
        select(Fault.fault_class, func.count())
        .where(Fault.state == "open", visible_sites(user, col(Fault.site_id)))
        .group_by(col(Fault.fault_class))
    )).all()
    return {cls: int(n) for cls, n in sorted(rows)}


@dataclass
class UnitView:
    """A unit with its key latest readings and open faults."""

    unit: Unit
    values: dict[str, tuple[float | None, str | None, datetime | None]]
    faults: list[Fault]

    @property
    def status(self) -> str:
        """`comm lost`, `fault`, `warning` or `ok`."""
        if self.unit.comm_lost:
            return "comm lost"
        if any(f.fault_class in ("A", "B") for f in self.faults):
            return "fault"
        return "warning" if self.faults else "ok"


async def site_units(session: AsyncSession, site_id: int) -> list[UnitView]:
    """The site's units with their key points' latest readings and open faults."""
    units = list((await session.exec(
        select(Unit).where(Unit.site_id == site_id).order_by(col(Unit.device))
    )).all())
    latest = (
        select(func.max(Telemetry.ts)).where(col(Telemetry.series_id) == col(Series.id))
        .correlate(Series).scalar_subquery()
    )
    key = sa.or_(*(col(Series.point).like(f"%{suffix}") for suffix in KEY_POINTS))
    readings = (await session.exec(
        select(col(Series.unit_id), col(Series.point), Telemetry)
        .join(Unit, col(Unit.id) == col(Series.unit_id))
        .join(Telemetry, sa.and_(col(Telemetry.series_id) == col(Series.id),
                                 col(Telemetry.ts) == latest))
        .where(Unit.site_id == site_id, key)
    )).all()
    values: dict[int, dict[str, tuple[float | None, str | None, datetime | None]]] = (
        defaultdict(dict)
    )
    for unit_id, point, row in readings:
        values[unit_id][point] = (row.value, row.text, row.ts)
    open_faults: dict[int, list[Fault]] = defaultdict(list)
    for f in (await session.exec(
        select(Fault).where(Fault.site_id == site_id, Fault.state == "open")
        .order_by(col(Fault.fault_class))
    )).all():
        open_faults[f.unit_id].append(f)
    return [UnitView(u, dict(sorted(values.get(u.id or 0, {}).items())),
                     open_faults.get(u.id or 0, [])) for u in units]


async def site_points(session: AsyncSession, site_id: int) -> list[str]:
    """Numeric-looking points of the site's units (for the chart's point picker)."""
    rows = (await session.exec(
        select(Series.point).join(Unit, col(Unit.id) == col(Series.unit_id))
        .where(Unit.site_id == site_id).distinct().order_by(col(Series.point))
    )).all()
    return list(rows)


async def chart_samples(
    session: AsyncSession, unit_id: int, point: str, start: datetime, end: datetime,
    width_s: int,
) -> list[Sample]:
    """Rollup buckets of one point (raw readings while no rollup exists yet, e.g. a new site)."""
    sid = (await session.exec(
        select(Series.id).where(Series.unit_id == unit_id, Series.point == point)
    )).first()
    if sid is None:
        return []
    rollups = (await session.exec(
        select(Rollup).where(Rollup.series_id == sid, Rollup.width_s == width_s,
                             col(Rollup.bucket) >= start, col(Rollup.bucket) < end)
        .order_by(col(Rollup.bucket))
    )).all()
    if len(rollups) >= 2:
        return [Sample(r.bucket, r.sum / r.count, r.min, r.max) for r in rollups if r.count]
    raw = (await session.exec(
        select(Telemetry.ts, Telemetry.value)
        .where(Telemetry.series_id == sid, col(Telemetry.ts) >= max(start, end - timedelta(
            hours=1)), col(Telemetry.ts) < end, col(Telemetry.value).is_not(None))
        .order_by(col(Telemetry.ts).desc()).limit(500)
    )).all()
    return [Sample(ts, v, v, v) for ts, v in reversed(raw) if v is not None]
