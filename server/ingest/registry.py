"""The fleet as ingest sees it: site codes, agents, units and series, cached in process.

Storage and the worker share one `Registry`, so there is one place that knows how a topic's
site code becomes a `Site`, how an agent's `device` becomes a `Unit` (created on first sight,
its serial, model and firmware kept from what it reports), and how a unit's point becomes a
`Series` id. In steady state every lookup is a dict hit and ingest does no queries for them.

Creation is race-safe across server processes: rows are inserted with ON CONFLICT DO NOTHING
and whatever another process created first is read back. Rows created (or changed) inside a
transaction are only published to the shared cache when that transaction commits (a session
event), so a rolled-back batch never leaves the cache pointing at ids that do not exist.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.clock import Clock, SystemClock
from protocols.messages import AgentState, Status
from protocols.profiles import all_profiles
from server.errors import IngestError
from server.models import Agent, Series, Site, Unit

SITE_TTL_S = 30.0
"""How long a known site is trusted before it is read again (policy or time zone changes)."""
SITE_AHEAD_S = 10.0
"""A site read again also reads every known site that would expire within this, in the same
query: a fleet of small sites costs a few queries per `SITE_TTL_S`, not one per site."""
SITE_READ_MAX = 500
"""Most site codes in one such query."""
MISSING_TTL_S = 5.0
"""How long an unknown site code or agent id is remembered as unknown."""
DEVICE_MAX = 64
POINT_MAX = 96
"""Column widths of `unit.device` and `series.point` (the wire allows 128)."""

UnitKey = tuple[int, str]
"""(site id, device name as the agent calls it)."""

_ids = itertools.count()


@functools.cache
def series_by_model() -> Mapping[str, str]:
    """Product series of each shipped profile's model (`EMU-BS100` -> `EMU-BS`)."""
    return {p.model: p.series for p in all_profiles()}


@dataclass(frozen=True, slots=True)
class UnitInfo:
    """What ingest needs to know about a unit (a snapshot; replaced, never mutated)."""

    id: int
    site_id: int
    device: str
    series: str | None
    model: str | None
    serial: str | None
    firmware: str | None
    comm_lost: bool
    last_seen: datetime | None

    @classmethod
    def of(cls, row: Any) -> UnitInfo:
        """From a `Unit` or a row with the same column names."""
        return cls(row.id, row.site_id, row.device, row.series, row.model, row.serial,
                   row.firmware, row.comm_lost, row.last_seen)


@dataclass
class _Pending:
    """What one open transaction created or changed; published when it commits."""

    units: dict[UnitKey, UnitInfo] = field(default_factory=dict)
    series: dict[UnitKey, dict[str, int]] = field(default_factory=dict)
    agents: dict[str, int] = field(default_factory=dict)


_PG_TOUCH = (
    "UPDATE unit AS u SET last_seen = v.ts"
    " FROM unnest(%(ids)s::int[], %(ts)s::timestamptz[]) AS v(id, ts)"
    " WHERE u.id = v.id AND (u.last_seen IS NULL OR u.last_seen < v.ts)"
)
_SQLITE_TOUCH = (
    "UPDATE unit SET last_seen = v.ts FROM (SELECT json_extract(value, '$[0]') AS id,"
    " json_extract(value, '$[1]') AS ts FROM json_each(?)) AS v"
    " WHERE unit.id = v.id AND (unit.last_seen IS NULL OR unit.last_seen < v.ts)"
)


def sqlite_ts(ts: datetime) -> str:
    """A UTC timestamp as SQLite stores it: the text `UTCDateTime` writes (compared as text)."""
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def row_id(row: Site | Unit | Agent) -> int:
    """The id of a row read from the database (a row without one is a bug upstream)."""
    if row.id is None:
        raise ValueError(f"{type(row).__name__} has no id: it was never stored")
    return row.id


def dialect_insert(session: AsyncSession) -> Callable[[Any], Any]:
    """`insert` of the session's dialect, which offers ON CONFLICT DO NOTHING."""
    name = session.sync_session.get_bind().dialect.name
    return postgresql.insert if name == "postgresql" else sqlite.insert


class Registry:
    """Cached site, agent, unit and series lookups; one per process, shared by all sessions."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self._key = f"emu.registry.{next(_ids)}"
        self._sites: dict[str, tuple[Site | None, float]] = {}
        self._agents: dict[str, int] = {}
        self._missing_agents: dict[str, float] = {}
        self._units: dict[UnitKey, UnitInfo] = {}
        self._series: dict[UnitKey, dict[str, int]] = {}

    # -- transactions ---------------------------------------------------------------------
    def _pending(self, session: AsyncSession) -> _Pending:
        sync = session.sync_session
        pending: _Pending | None = sync.info.get(self._key)
        if pending is not None:
            return pending
        new = _Pending()
        sync.info[self._key] = new

        # Both events also fire for SAVEPOINTs; only the outer transaction's outcome counts.
        # (Nothing is created inside a savepoint that may roll back: see `TelemetryStore`.)
        def committed(s: Session) -> None:
            if s.info.get(self._key) is new and not s.in_nested_transaction():
                del s.info[self._key]
                self._publish(new)

        def rolled_back(s: Session) -> None:
            if s.info.get(self._key) is new and not s.in_nested_transaction():
                del s.info[self._key]

        event.listen(sync, "after_commit", committed)
        event.listen(sync, "after_rollback", rolled_back)
        return new

    def _publish(self, pending: _Pending) -> None:
        self._units.update(pending.units)
        for key, points in pending.series.items():
            self._series.setdefault(key, {}).update(points)
        self._agents.update(pending.agents)

    def _peek(self, session: AsyncSession) -> _Pending | None:
        pending: _Pending | None = session.sync_session.info.get(self._key)
        return pending

    # -- sites ----------------------------------------------------------------------------
    async def site(self, session: AsyncSession, code: str) -> Site | None:
        """The site whose topic code is `code`, or None (both cached for a while).

        Known sites about to expire are read again in the same query (`SITE_AHEAD_S`).
        """
        now = self.clock.monotonic()
        hit = self._sites.get(code)
        if hit is not None and hit[1] > now:
            return hit[0]
        soon = now + SITE_AHEAD_S
        codes = [code, *itertools.islice(
            (c for c, (site, until) in self._sites.items()
             if site is not None and until <= soon and c != code), SITE_READ_MAX - 1)]
        rows = await session.exec(select(Site).where(col(Site.code).in_(codes)))
        found = {site.code: site for site in rows.all()}
        for c in codes:
            site = found.get(c)
            self._sites[c] = (site, now + (SITE_TTL_S if site is not None else MISSING_TTL_S))
        return found.get(code)

    def peek_site(self, code: str) -> tuple[bool, Site | None]:
        """(known, site) from the cache alone: (False, None) means "ask `site`"."""
        hit = self._sites.get(code)
        if hit is None or hit[1] <= self.clock.monotonic():
            return False, None
        return True, hit[0]

    def forget_site(self, code: str) -> None:
        """Drop a cached site (after it was created, changed or deleted here)."""
        self._sites.pop(code, None)

    # -- agents ---------------------------------------------------------------------------
    async def agent_site(self, session: AsyncSession, agent_id: str) -> int | None:
        """Site id of a registered agent, None for an agent not (yet) registered."""
        site_id = self._agents.get(agent_id)
        if site_id is not None:
            return site_id
        pending = self._peek(session)
        if pending is not None and agent_id in pending.agents:
            return pending.agents[agent_id]
        now = self.clock.monotonic()
        if self._missing_agents.get(agent_id, 0.0) > now:
            return None
        found = (await session.exec(
            select(Agent.site_id).where(Agent.agent_id == agent_id)
        )).first()
        if found is None:
            self._missing_agents[agent_id] = now + MISSING_TTL_S
            return None
        self._agents[agent_id] = found
        return found

    def peek_agent(self, agent_id: str) -> tuple[bool, int | None]:
        """(known, site id) from the cache alone: (False, None) means "ask `agent_site`"."""
        site_id = self._agents.get(agent_id)
        if site_id is not None:
            return True, site_id
        if self._missing_agents.get(agent_id, 0.0) > self.clock.monotonic():
            return True, None
        return False, None

    async def apply_status(self, session: AsyncSession, site: Site, status: Status) -> Agent:
        """Record an agent's presence, version and health; register an unknown agent.

        Statuses are applied in arrival order (the retained `offline` will carries the time of
        its connect, so an older `ts` is not a reason to ignore it); `last_seen` only moves on.
        Raises IngestError when the agent is registered to another site.
        """
        site_id = row_id(site)
        agent = (await session.exec(
            select(Agent).where(Agent.agent_id == status.agent)
        )).first()
        if agent is None:
            agent = Agent(agent_id=status.agent, site_id=site_id)
            session.add(agent)
        elif agent.site_id != site_id:
            raise IngestError(
                f"agent {status.agent!r} belongs to site id {agent.site_id}, "
                f"not to {site.code!r}"
            )
        agent.online = status.state is AgentState.ONLINE
        agent.version = status.version
        if agent.last_seen is None or status.ts > agent.last_seen:
            agent.last_seen = status.ts
        if status.health is not None:
            agent.health = status.health.model_dump(mode="json")
        await session.flush()
        self._pending(session).agents[status.agent] = site_id
        self._missing_agents.pop(status.agent, None)
        return agent

    # -- units ----------------------------------------------------------------------------
    def cached_unit(self, key: UnitKey) -> UnitInfo | None:
        """A committed unit from the cache (no query)."""
        return self._units.get(key)

    def series_map(self, key: UnitKey) -> dict[str, int] | None:
        """point -> series id of a unit, as far as committed and cached (no query)."""
        return self._series.get(key)

    def series_in(self, session: AsyncSession, key: UnitKey) -> dict[str, int] | None:
        """point -> series id of a unit as this session sees it (cache plus its own new ones)."""
        known = self._series.get(key)
        pending = self._peek(session)
        if pending is None or key not in pending.series:
            return known
        return {**(known or {}), **pending.series[key]}

    def unit_in(self, session: AsyncSession, key: UnitKey) -> UnitInfo | None:
        """The freshest snapshot of a unit as this session sees it (cache or pending)."""
        pending = self._peek(session)
        if pending is not None and key in pending.units:
            return pending.units[key]
        return self._units.get(key)

    async def units(
        self, session: AsyncSession, site_id: int, devices: Iterable[str], seen: datetime
    ) -> dict[str, UnitInfo]:
        """Units of `site_id` by device name, creating those never seen (first_seen=`seen`)."""
        out: dict[str, UnitInfo] = {}
        wanted: set[str] = set()
        for device in devices:
            info = self.unit_in(session, (site_id, device))
            if info is None:
                wanted.add(device)
            else:
                out[device] = info
        if not wanted:
            return out
        for device in wanted:
            if len(device) > DEVICE_MAX:
                raise IngestError(f"device name {device[:40]!r}... is over {DEVICE_MAX} characters")
        table = Unit.__table__  # type: ignore[attr-defined]
        conn = await session.connection()
        found = await conn.execute(
            sa.select(table).where(table.c.site_id == site_id, table.c.device.in_(wanted))
        )
        for row in found:
            info = UnitInfo.of(row)
            self._units[(site_id, info.device)] = info
            out[info.device] = info
        wanted -= out.keys()
        if not wanted:
            return out
        insert = dialect_insert(session)
        created = await conn.execute(
            insert(table)
            .values([{"site_id": site_id, "device": d, "comm_lost": False, "first_seen": seen}
                      for d in sorted(wanted)])
            .on_conflict_do_nothing()
            .returning(*table.c)
        )
        pending = self._pending(session)
        for row in created:
            info = UnitInfo.of(row)
            pending.units[(site_id, info.device)] = info
            out[info.device] = info
        wanted -= out.keys()
        if wanted:  # another process created them in the meantime: read its rows
            found = await conn.execute(
                sa.select(table).where(table.c.site_id == site_id, table.c.device.in_(wanted))
            )
            for row in found:
                info = UnitInfo.of(row)
                self._units[(site_id, info.device)] = info
                out[info.device] = info
        return out

    async def update_unit(self, session: AsyncSession, unit: UnitInfo, **changes: Any) -> UnitInfo:
        """Write changed columns of a unit (only those that differ); returns the new snapshot."""
        changed = {k: v for k, v in changes.items() if getattr(unit, k) != v}
        if not changed:
            return unit
        table = Unit.__table__  # type: ignore[attr-defined]
        conn = await session.connection()
        await conn.execute(sa.update(table).where(table.c.id == unit.id).values(**changed))
        new = replace(unit, **changed)
        self._pending(session).units[(unit.site_id, unit.device)] = new
        return new

    async def touch_units(self, session: AsyncSession, seen: Mapping[UnitInfo, datetime]) -> None:
        """Move `last_seen` of units forward (never back: replays carry old times).

        One statement for all units (this runs in every ingest transaction).
        """
        moved = [(u, ts) for u, ts in seen.items() if u.last_seen is None or ts > u.last_seen]
        if not moved:
            return
        conn = await session.connection()
        if conn.dialect.name == "postgresql":
            await conn.exec_driver_sql(_PG_TOUCH, {
                "ids": [u.id for u, _ in moved], "ts": [ts for _, ts in moved]})
        else:
            rows = [[u.id, sqlite_ts(ts)] for u, ts in moved]
            await conn.exec_driver_sql(_SQLITE_TOUCH, (json.dumps(rows),))
        pending = self._pending(session)
        for unit, ts in moved:
            key = (unit.site_id, unit.device)
            current = pending.units.get(key, unit)
            pending.units[key] = replace(current, last_seen=ts)

    # -- series ---------------------------------------------------------------------------
    async def series(
        self, session: AsyncSession, unit: UnitInfo, points: Iterable[str]
    ) -> dict[str, int]:
        """Series ids of a unit's points, creating those never seen."""
        key = (unit.site_id, unit.device)
        known = self._series.get(key, {})
        pending = self._pending(session)
        staged = pending.series.get(key, {})
        out: dict[str, int] = {}
        wanted: set[str] = set()
        for point in points:
            sid = known.get(point) or staged.get(point)
            if sid is None:
                wanted.add(point)
            else:
                out[point] = sid
        if not wanted:
            return out
        for point in wanted:
            if len(point) > POINT_MAX:
                raise IngestError(f"point name {point[:40]!r}... is over {POINT_MAX} characters")
        table = Series.__table__  # type: ignore[attr-defined]
        conn = await session.connection()

        async def read_back() -> None:
            rows = await conn.execute(
                sa.select(table.c.id, table.c.point)
                .where(table.c.unit_id == unit.id, table.c.point.in_(wanted))
            )
            for sid, point in rows:
                self._series.setdefault(key, {})[point] = sid
                out[point] = sid
                wanted.discard(point)

        await read_back()
        if not wanted:
            return out
        created = await conn.execute(
            dialect_insert(session)(table)
            .values([{"unit_id": unit.id, "point": p} for p in sorted(wanted)])
            .on_conflict_do_nothing()
            .returning(table.c.id, table.c.point)
        )
        staged = pending.series.setdefault(key, {})
        for sid, point in created:
            staged[point] = sid
            out[point] = sid
            wanted.discard(point)
        if wanted:
            await read_back()
        return out

    async def unit_rows(
        self, session: AsyncSession, ids: Iterable[int], refresh: bool = False
    ) -> dict[int, Unit]:
        """`Unit` rows attached to `session` (for hooks that may change them), by id."""
        wanted = set(ids)
        if not wanted:
            return {}
        stmt = select(Unit).where(col(Unit.id).in_(wanted))
        if refresh:
            stmt = stmt.execution_options(populate_existing=True)
        rows = await session.exec(stmt)
        return {u.id: u for u in rows.all() if u.id is not None}
