"""Telemetry, events and agent status into the database, each batch exactly once.

A batch is claimed first: its (agent, stream, seq) goes into `ingestedbatch` with ON CONFLICT
DO NOTHING in the same transaction as its rows, so a replayed batch (agent restart, broker
redelivery, two server processes) claims nothing and is skipped whole. Readings become narrow
`telemetry` rows (series, ts, value, text, quality): numbers (and booleans, as 0/1) in
`value`, strings in `text`. PostgreSQL takes them by binary COPY, SQLite by one prepared
INSERT run over all rows (executemany). Two readings of one series at one instant clash on the
primary key; such a batch is stored again with ON CONFLICT DO NOTHING (first reading wins):
in place, or (`conflicts="raise"`, the ingest worker, which spares PostgreSQL a savepoint)
by the caller in a new transaction.

`points` and `rollups` are the read side the API uses.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.clock import Clock, SystemClock
from protocols.messages import Event, EventBatch, EventKind, Quality, Status, TelemetryBatch
from protocols.messages import TelemetryPoint as Point
from server.errors import IngestError
from server.ingest.registry import (
    Registry,
    UnitInfo,
    UnitKey,
    dialect_insert,
    row_id,
    series_by_model,
    sqlite_ts,
)
from server.models import Agent, Rollup, Series, Site, Telemetry
from server.models import Event as EventRow

TELEMETRY = "telemetry"
EVENTS = "events"
"""`ingestedbatch.stream` of each kind of batch."""

QUALITY_CODES: Mapping[Quality, int] = {
    Quality.GOOD: 0,
    Quality.STALE: 1,
    Quality.COMM_LOST: 2,
    Quality.OUT_OF_RANGE: 3,
}
"""How a reading's quality is stored (`telemetry.quality`, a smallint)."""
QUALITY_BY_CODE: Mapping[int, Quality] = {code: q for q, code in QUALITY_CODES.items()}

TEXT_MAX = 200
"""Width of `telemetry.text`; longer strings are cut."""

SERIAL, MODEL, VERSION, FW_VERSION = "common.SN", "common.Md", "common.Vr", "emu.FwVer"
META_POINTS = frozenset({SERIAL, MODEL, VERSION, FW_VERSION})
"""Points that describe the unit itself: they also update `unit` (serial, model, firmware)."""

COPY_SQL = "COPY telemetry (series_id, ts, value, text, quality) FROM STDIN (FORMAT BINARY)"
COPY_TYPES = ("int4", "timestamptz", "float8", "text", "int2")
SQLITE_INSERT = "INSERT INTO telemetry (series_id, ts, value, text, quality) VALUES (?, ?, ?, ?, ?)"
SQLITE_INSERT_IGNORING = SQLITE_INSERT + " ON CONFLICT DO NOTHING"

_PG_CLAIM = (
    "INSERT INTO ingestedbatch (agent, stream, seq, received_at, points)"
    " SELECT a, %(stream)s, s, %(now)s, n"
    " FROM unnest(%(agents)s::varchar[], %(seqs)s::bigint[], %(points)s::int[]) AS t(a, s, n)"
    " ON CONFLICT DO NOTHING RETURNING agent, seq"
)
_SQLITE_CLAIM = (
    "INSERT INTO ingestedbatch (agent, stream, seq, received_at, points)"
    " SELECT json_extract(value, '$[0]'), ?1, json_extract(value, '$[1]'), ?2,"
    " json_extract(value, '$[2]') FROM json_each(?3) WHERE true"
    " ON CONFLICT DO NOTHING RETURNING agent, seq"
)

Conflicts = Literal["savepoint", "raise", "ignore"]

Row = tuple[int, Any, float | None, str | None, int]
"""One `telemetry` row: series id, ts (datetime; text on SQLite), value, text, quality code."""


@dataclass
class UnitPoints:
    """The readings of one unit in one stored batch (what the fault engine is given)."""

    unit: UnitInfo
    points: list[Point] = field(default_factory=list)
    newest: datetime | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class StoredTelemetry:
    """A telemetry batch that was new and is now stored (in the open transaction)."""

    site: Site
    batch: TelemetryBatch
    units: list[UnitPoints]
    rows: int


@dataclass
class StoredEvents:
    """An event batch that was new and is now stored, each event with its unit if any."""

    site: Site
    batch: EventBatch
    events: list[tuple[UnitInfo | None, Event]]


class PointRow(NamedTuple):
    """A raw reading as the API returns it."""

    ts: datetime
    value: float | None
    text: str | None
    quality: Quality | None


class ReadingsClash(IngestError):
    """A reading repeats a stored (series, ts) and the transaction is lost (conflicts="raise")."""


class TelemetryStore:
    """Stores validated batches; one per process (it shares the registry's caches)."""

    def __init__(self, registry: Registry | None = None, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self.registry = registry or Registry(self.clock)

    # -- telemetry ------------------------------------------------------------------------
    async def store_telemetry(
        self, session: AsyncSession, site: Site, batch: TelemetryBatch
    ) -> StoredTelemetry | None:
        """Store one batch; None if it was stored before (a duplicate)."""
        return (await self.store_telemetry_many(session, [(site, batch)]))[0]

    async def store_telemetry_many(
        self, session: AsyncSession, items: Sequence[tuple[Site, TelemetryBatch]],
        conflicts: Conflicts = "savepoint",
    ) -> list[StoredTelemetry | None]:
        """Store several batches in the session's transaction; None for each duplicate.

        `conflicts` says what a reading whose (series, ts) is already stored does (rare: a
        batch repeating a reading, or readings sent again under a new seq). "savepoint":
        the bulk insert runs in a savepoint and, on a clash, again with ON CONFLICT DO
        NOTHING. "raise" (the ingest worker): no savepoint, which PostgreSQL makes costly for
        every row; a clash raises ReadingsClash and the transaction is lost, so the caller
        rolls back and stores the group again with "ignore" (ON CONFLICT DO NOTHING).
        On SQLite a clash never loses the transaction: "raise" behaves as "savepoint", and
        neither needs a savepoint there.
        """
        fresh_keys = await self._claim(
            session, TELEMETRY, [(b.agent, b.seq, len(b.points)) for _, b in items]
        )
        fresh: list[tuple[Site, TelemetryBatch]] = []
        for site, batch in items:
            key = (batch.agent, batch.seq)
            if key in fresh_keys:
                fresh_keys.discard(key)  # a batch given twice in `items` is stored once
                fresh.append((site, batch))
        results: dict[tuple[str, int], StoredTelemetry] = {}
        if fresh:
            per_batch = await self._write(session, fresh, conflicts)
            await self._update_units(session, per_batch)
            for (site, batch), units in zip(fresh, per_batch, strict=True):
                results[(batch.agent, batch.seq)] = StoredTelemetry(
                    site, batch, units, sum(len(u.points) for u in units)
                )
        return [results.pop((b.agent, b.seq), None) for _, b in items]

    async def _claim(
        self, session: AsyncSession, stream: str, batches: Sequence[tuple[str, int, int]]
    ) -> set[tuple[str, int]]:
        """Insert (agent, stream, seq) of each batch; return those that were not there yet.

        One statement per group, written by hand: SQLAlchemy's multi-row VALUES costs several
        times the database's own work here, and this runs in every ingest transaction.
        """
        if not batches:
            return set()
        unique = {(agent, seq): n for agent, seq, n in batches}
        now = self.clock.now()
        conn = await session.connection()
        claimed: Any  # rows of (agent, seq)
        if conn.dialect.name == "postgresql":
            claimed = await conn.exec_driver_sql(_PG_CLAIM, {
                "stream": stream, "now": now, "agents": [a for a, _ in unique],
                "seqs": [s for _, s in unique], "points": list(unique.values())})
        else:
            rows = [[a, s, n] for (a, s), n in unique.items()]
            claimed = await conn.exec_driver_sql(
                _SQLITE_CLAIM, (stream, sqlite_ts(now), json.dumps(rows)))
        return {(agent, seq) for agent, seq in claimed}

    async def _write(
        self, session: AsyncSession, fresh: Sequence[tuple[Site, TelemetryBatch]],
        conflicts: Conflicts,
    ) -> list[list[UnitPoints]]:
        """Insert the rows of `fresh`, creating units and series seen for the first time."""
        dialect = (await session.connection()).dialect
        sqlite = dialect.name != "postgresql"
        if not sqlite and dialect.driver != "psycopg":
            raise IngestError(
                f"telemetry ingest into PostgreSQL needs the psycopg driver (COPY); the "
                f"database URL names {dialect.driver}: use postgresql+psycopg://"
            )
        if conflicts == "raise" and not sqlite:
            return await self._stream(session, fresh)
        rows, per_batch = await self._rows(session, fresh, sqlite)
        if conflicts == "ignore":
            await self._insert_ignoring(session, rows, sqlite)
        elif sqlite:
            # A failed row of an executemany leaves the rows before it and the transaction in
            # place (SQLite undoes one statement); the second pass skips what is there.
            try:
                await self._executemany(session, rows, SQLITE_INSERT)
            except sa.exc.IntegrityError:
                await self._insert_ignoring(session, rows, sqlite)
        else:
            try:
                async with session.begin_nested():
                    await self._copy(session, rows)
            except Exception as exc:
                if not _is_unique_violation(exc):
                    raise
                await self._insert_ignoring(session, rows, sqlite)
        return per_batch

    async def _rows(
        self, session: AsyncSession, fresh: Sequence[tuple[Site, TelemetryBatch]], sqlite: bool
    ) -> tuple[list[Row], list[list[UnitPoints]]]:
        """All rows (and readings per unit), after creating whatever series were missing."""
        for _ in range(3):
            per_batch: list[list[UnitPoints]] = []
            missing: dict[UnitKey, set[str]] = {}
            rows = list(self._encode(session, fresh, per_batch, missing, sqlite))
            if not missing:
                return rows, per_batch
            await self._resolve(session, missing)
        raise AssertionError("units and series were created but are still unknown")

    async def _stream(
        self, session: AsyncSession, fresh: Sequence[tuple[Site, TelemetryBatch]]
    ) -> list[list[UnitPoints]]:
        """COPY batch after batch, encoding the next while PostgreSQL stores the last.

        No savepoint (PostgreSQL pays for one on every row of a subtransaction): a batch with
        a series not cached yet ends the COPY, its units and series are created, and a new
        COPY goes on; a duplicate (series, ts) fails the transaction with ReadingsClash.
        """
        conn = await session.connection()
        pg: Any = (await conn.get_raw_connection()).driver_connection
        per_batch: list[list[UnitPoints]] = []
        stack: contextlib.AsyncExitStack | None = None
        write_row: Any = None
        write: Any = None
        try:
            for item in fresh:
                for _ in range(3):
                    units: list[list[UnitPoints]] = []
                    missing: dict[UnitKey, set[str]] = {}
                    rows = list(self._encode(session, [item], units, missing, False))
                    if not missing:
                        break
                    if stack is not None:  # statements may not run while a COPY is open
                        done, stack = stack, None
                        await done.aclose()
                    await self._resolve(session, missing)
                else:
                    raise AssertionError("units and series were created but are still unknown")
                per_batch.extend(units)
                if stack is None:
                    stack = contextlib.AsyncExitStack()
                    cur = await stack.enter_async_context(pg.cursor())
                    copy = await stack.enter_async_context(cur.copy(COPY_SQL))
                    copy.set_types(COPY_TYPES)
                    # The formatter fills a buffer row by row and hands it over once large:
                    # one await per buffer instead of one per row (`AsyncCopy.write_row`).
                    write_row, write = copy.formatter.write_row, copy.write
                for row in rows:
                    if data := write_row(row):
                        await write(data)
            if stack is not None:
                done, stack = stack, None
                await done.aclose()
        except BaseException as exc:
            if stack is not None:
                await stack.__aexit__(type(exc), exc, exc.__traceback__)
            if _is_unique_violation(exc):
                raise ReadingsClash(
                    "a reading repeats a stored (series, ts); store the group again with "
                    "conflicts='ignore'"
                ) from exc
            raise
        return per_batch

    def _encode(
        self, session: AsyncSession, fresh: Sequence[tuple[Site, TelemetryBatch]],
        per_batch: list[list[UnitPoints]], missing: dict[UnitKey, set[str]], sqlite: bool,
    ) -> Iterator[Row]:
        """The hot loop: readings to rows through the caches (each reading is visited once).

        Fills `per_batch` (readings per unit, newest time) and `missing` (uncached series) as
        it goes. On SQLite `ts` comes out as the text `UTCDateTime` stores.
        """
        registry = self.registry
        codes = QUALITY_CODES
        meta_points = META_POINTS
        last_ts: datetime | None = None
        stamp: Any = None
        for site, batch in fresh:
            site_id = row_id(site)
            units: dict[str, UnitPoints] = {}
            device: str | None = None
            series: dict[str, int] = {}
            acc: UnitPoints | None = None
            newest: datetime | None = None
            for p in batch.points:
                if p.device != device:
                    if acc is not None:
                        acc.newest = newest
                    device = p.device
                    key = (site_id, device)
                    series = registry.series_in(session, key) or {}
                    acc = units.get(device)
                    if acc is None:
                        unit = registry.unit_in(session, key)
                        if unit is not None:
                            acc = units[device] = UnitPoints(unit)
                    newest = None if acc is None else acc.newest
                sid = series.get(p.point)
                if sid is None or acc is None:
                    missing.setdefault((site_id, p.device), set()).add(p.point)
                    continue
                ts = p.ts
                if ts is not last_ts and ts != last_ts:  # a cycle's readings share one object
                    last_ts = ts
                    stamp = sqlite_ts(ts) if sqlite else ts
                value = p.value
                if value is None:
                    yield (sid, stamp, None, None, codes[p.quality])
                elif isinstance(value, str):
                    yield (sid, stamp, None, value[:TEXT_MAX], codes[p.quality])
                    if p.point in meta_points:
                        acc.meta[p.point] = value
                else:
                    yield (sid, stamp, float(value), None, codes[p.quality])
                acc.points.append(p)
                if newest is None or (ts is not newest and ts > newest):
                    newest = ts
            if acc is not None:
                acc.newest = newest
            per_batch.append(list(units.values()))

    async def _resolve(self, session: AsyncSession, missing: dict[UnitKey, set[str]]) -> None:
        """Create (or read) the units and series the hot loop did not find."""
        by_site: dict[int, set[str]] = {}
        for site_id, device in missing:
            by_site.setdefault(site_id, set()).add(device)
        seen = self.clock.now()
        for site_id, devices in by_site.items():
            units = await self.registry.units(session, site_id, sorted(devices), seen)
            for device in sorted(devices):
                await self.registry.series(session, units[device], missing[(site_id, device)])

    async def _copy(self, session: AsyncSession, rows: list[Row]) -> None:
        conn = await session.connection()
        pg: Any = (await conn.get_raw_connection()).driver_connection
        async with pg.cursor() as cur, cur.copy(COPY_SQL) as copy:
            copy.set_types(COPY_TYPES)
            write_row = copy.formatter.write_row
            for row in rows:
                if data := write_row(row):
                    await copy.write(data)

    async def _executemany(self, session: AsyncSession, rows: list[Row], sql: str) -> None:
        conn = await session.connection()
        await conn.exec_driver_sql(sql, rows)

    async def _insert_ignoring(self, session: AsyncSession, rows: list[Row], sqlite: bool) -> None:
        """Insert, skipping rows whose (series, ts) is already stored (the rare path)."""
        if sqlite:
            await self._executemany(session, rows, SQLITE_INSERT_IGNORING)
            return
        table = Telemetry.__table__  # type: ignore[attr-defined]
        conn = await session.connection()
        await conn.execute(
            dialect_insert(session)(table).on_conflict_do_nothing(),
            [{"series_id": s, "ts": ts, "value": v, "text": t, "quality": q}
             for s, ts, v, t, q in rows],
        )

    async def _update_units(self, session: AsyncSession, per_batch: list[list[UnitPoints]]) -> None:
        """Serial, model and firmware from what units report; `last_seen` from their readings."""
        newest: dict[UnitKey, datetime] = {}
        meta: dict[UnitKey, dict[str, str]] = {}
        snapshot: dict[UnitKey, UnitInfo] = {}
        for units in per_batch:
            for acc in units:
                key = (acc.unit.site_id, acc.unit.device)
                snapshot[key] = acc.unit
                if acc.newest is not None and (key not in newest or acc.newest > newest[key]):
                    newest[key] = acc.newest
                if acc.meta:
                    meta.setdefault(key, {}).update(acc.meta)
        for key, values in meta.items():
            unit = self.registry.unit_in(session, key) or snapshot[key]
            await self.registry.update_unit(session, unit, **_unit_fields(unit, values))
        seen: dict[UnitInfo, datetime] = {}
        for key, ts in newest.items():
            seen[self.registry.unit_in(session, key) or snapshot[key]] = ts
        await self.registry.touch_units(session, seen)

    # -- events and status ----------------------------------------------------------------
    async def store_events(
        self, session: AsyncSession, site: Site, batch: EventBatch
    ) -> StoredEvents | None:
        """Store an event batch once; comm_lost / comm_restored also set `unit.comm_lost`."""
        site_id = row_id(site)
        if not await self._claim(session, EVENTS, [(batch.agent, batch.seq, len(batch.events))]):
            return None
        devices = sorted({e.device for e in batch.events if e.device is not None})
        units = await self.registry.units(session, site_id, devices, self.clock.now())
        out: list[tuple[UnitInfo | None, Event]] = []
        values: list[dict[str, Any]] = []
        for ev in batch.events:
            unit = None if ev.device is None else units[ev.device]
            if unit is not None and ev.kind in (EventKind.COMM_LOST, EventKind.COMM_RESTORED):
                unit = await self.registry.update_unit(
                    session, unit, comm_lost=ev.kind is EventKind.COMM_LOST
                )
                units[unit.device] = unit
            out.append((unit, ev))
            values.append({
                "site_id": site_id, "unit_id": None if unit is None else unit.id, "ts": ev.ts,
                "kind": ev.kind.value, "code": ev.code, "severity": ev.severity.value,
                "detail": ev.detail,
            })
        if values:
            conn = await session.connection()
            await conn.execute(sa.insert(EventRow.__table__), values)  # type: ignore[attr-defined]
        return StoredEvents(site, batch, out)

    async def apply_status(self, session: AsyncSession, site: Site, status: Status) -> Agent:
        """An agent's presence, version and health (see `Registry.apply_status`)."""
        return await self.registry.apply_status(session, site, status)


def _unit_fields(unit: UnitInfo, values: Mapping[str, str]) -> dict[str, str | None]:
    """Unit columns from its self-description points (values cut to the column widths)."""
    out: dict[str, str | None] = {}
    if values.get(SERIAL):
        out["serial"] = values[SERIAL].strip()[:64]
    if values.get(MODEL):
        model = values[MODEL].strip()[:64]
        out["model"] = model
        out["series"] = series_by_model().get(model, unit.series)
    firmware = values.get(FW_VERSION) or values.get(VERSION)
    if firmware:
        out["firmware"] = firmware.strip()[:32]
    return out


def _is_unique_violation(exc: BaseException) -> bool:
    """psycopg raises its own UniqueViolation from a raw COPY (not wrapped by SQLAlchemy)."""
    return getattr(exc, "sqlstate", None) == "23505"


# -- read side ------------------------------------------------------------------------------
async def _series_id(session: AsyncSession, unit_id: int, point: str) -> int | None:
    return (await session.exec(
        select(Series.id).where(Series.unit_id == unit_id, Series.point == point)
    )).first()


async def points(
    session: AsyncSession, unit_id: int, point: str, start: datetime, end: datetime,
    limit: int = 10_000,
) -> list[PointRow]:
    """Raw readings of one unit's point in [start, end), oldest first, at most `limit`."""
    sid = await _series_id(session, unit_id, point)
    if sid is None:
        return []
    rows = await session.exec(
        select(Telemetry.ts, Telemetry.value, Telemetry.text, Telemetry.quality)
        .where(Telemetry.series_id == sid, col(Telemetry.ts) >= start, col(Telemetry.ts) < end)
        .order_by(col(Telemetry.ts))
        .limit(limit)
    )
    return [PointRow(ts, value, text, QUALITY_BY_CODE.get(q)) for ts, value, text, q in rows]


async def rollups(
    session: AsyncSession, unit_id: int, point: str, width_s: int, start: datetime,
    end: datetime,
) -> list[Rollup]:
    """Rollup rows (`width_s` 60 or 3600) of one unit's point with bucket in [start, end)."""
    sid = await _series_id(session, unit_id, point)
    if sid is None:
        return []
    rows = await session.exec(
        select(Rollup)
        .where(Rollup.series_id == sid, Rollup.width_s == width_s,
               col(Rollup.bucket) >= start, col(Rollup.bucket) < end)
        .order_by(col(Rollup.bucket))
    )
    return list(rows.all())
