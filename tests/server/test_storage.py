"""Storage: batches stored once, units registered, values typed; rollups and retention.

Runs on the session's database (SQLite, or PostgreSQL with EMU_TEST_DATABASE_URL); every test
makes its own site and agent ids, since the database is shared by the session.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import select

from protocols.clock import ManualClock
from protocols.messages import (
    AgentState,
    EventBatch,
    Health,
    Quality,
    Status,
    TelemetryBatch,
)
from server.core.config import StorageSettings
from server.core.db import Database, migrate_sync
from server.errors import IngestError
from server.ingest.registry import SITE_AHEAD_S, SITE_TTL_S, Registry
from server.models import Agent, Event, IngestedBatch, Site, Unit
from server.scheduler_jobs import RetentionMemo, floor_time, run_retention, run_rollups
from server.storage import PointRow, ReadingsClash, TelemetryStore, points, rollups
from tests.bench.server_data import MODEL, SERIES, T0, batch, iso, make_site, points_doc
from tests.support.database import fresh_database


@pytest.fixture
async def own_db(database_url: str, tmp_path: Path) -> AsyncIterator[Database]:
    """A database of its own: rollup watermarks are global, so these tests need one each."""
    with fresh_database(database_url, tmp_path) as url:
        migrate_sync(url)
        database = Database(url)
        try:
            yield database
        finally:
            await database.close()


def agent_id() -> str:
    return f"agent-{secrets.token_hex(4)}"


async def count_rows(db: Database, site: Site) -> int:
    async with db.session() as session:
        conn = await session.connection()
        return int((await conn.execute(sa.text(
            "SELECT count(*) FROM telemetry t JOIN series s ON s.id = t.series_id "
            "JOIN unit u ON u.id = s.unit_id WHERE u.site_id = :site"
        ), {"site": site.id})).scalar_one())


async def units_of(db: Database, site: Site) -> dict[str, Unit]:
    async with db.session() as session:
        rows = await session.exec(select(Unit).where(Unit.site_id == site.id))
        return {u.device: u for u in rows.all()}


async def store_all(db: Database, store: TelemetryStore, site: Site,
                    batches: list[TelemetryBatch]) -> list[object]:
    out: list[object] = []
    for b in batches:
        async with db.session() as session:
            out.append(await store.store_telemetry(session, site, b))
    return out


async def test_replaying_batches_stores_each_point_once(db: Database) -> None:
    site = await make_site(db)
    agent = agent_id()
    batches = [batch(agent, seq, points_doc(["u1", "u2"], 20, T0 + timedelta(seconds=seq),
                                            with_meta=seq == 0)) for seq in range(5)]
    store = TelemetryStore()
    first = await store_all(db, store, site, batches)
    assert all(r is not None for r in first)
    expected = sum(len(b.points) for b in batches)
    assert await count_rows(db, site) == expected

    again = await store_all(db, store, site, batches)  # the same process replays
    assert again == [None] * 5
    fresh = TelemetryStore()  # another process (cold caches) replays
    async with db.session() as session:
        grouped = await fresh.store_telemetry_many(session, [(site, b) for b in batches])
    assert grouped == [None] * 5
    assert await count_rows(db, site) == expected


async def test_a_group_with_the_same_batch_twice_stores_it_once(db: Database) -> None:
    site = await make_site(db)
    agent = agent_id()
    b0 = batch(agent, 0, points_doc(["u1"], 10, T0))
    b1 = batch(agent, 1, points_doc(["u1"], 10, T0 + timedelta(seconds=1)))
    async with db.session() as session:
        out = await TelemetryStore().store_telemetry_many(session, [(site, b0), (site, b1),
                                                                   (site, b0)])
    assert out[0] is not None
    assert out[1] is not None
    assert out[2] is None
    assert out[0].rows == 10
    assert await count_rows(db, site) == 20
    async with db.session() as session:
        claimed = (await session.exec(
            select(IngestedBatch).where(IngestedBatch.agent == agent)
        )).all()
    assert sorted((c.stream, c.seq, c.points) for c in claimed) == [
        ("telemetry", 0, 10), ("telemetry", 1, 10)]


async def test_units_are_registered_with_serial_model_series_and_firmware(db: Database) -> None:
    site = await make_site(db)
    agent = agent_id()
    store = TelemetryStore()
    doc = points_doc(["bs-1", "bs-2"], 3, T0, cycles=2, with_meta=True)
    await store_all(db, store, site, [batch(agent, 0, doc)])
    units = await units_of(db, site)
    assert set(units) == {"bs-1", "bs-2"}
    unit = units["bs-1"]
    assert (unit.serial, unit.model, unit.series, unit.firmware) == (
        "SN-bs-1", MODEL, SERIES, "1.2.3")  # emu.FwVer wins over common.Vr
    assert unit.last_seen == T0 + timedelta(seconds=1)
    first_seen = unit.first_seen

    # A replayed, older batch does not move last_seen back; a new firmware is picked up.
    old = [dict(p, ts=iso(T0 - timedelta(hours=1))) for p in doc]
    upgraded = [dict(p, value="1.3.0") if p["point"] == "emu.FwVer" else p
                for p in points_doc(["bs-1"], 3, T0 + timedelta(seconds=10), with_meta=True)]
    await store_all(db, store, site, [batch(agent, 1, old), batch(agent, 2, upgraded)])
    units = await units_of(db, site)
    assert units["bs-1"].last_seen == T0 + timedelta(seconds=10)
    assert units["bs-1"].firmware == "1.3.0"
    assert units["bs-1"].first_seen == first_seen
    assert units["bs-2"].firmware == "1.2.3"


async def test_firmware_falls_back_to_the_common_version(db: Database) -> None:
    site = await make_site(db)
    doc = [{"device": "pv-1", "point": "common.Vr", "ts": iso(T0), "value": "2.0.1",
            "quality": "good"},
           {"device": "pv-1", "point": "common.Md", "ts": iso(T0), "value": "EMU-PV50H",
            "quality": "good"},
           {"device": "pv-1", "point": "common.SN", "ts": iso(T0), "value": "PV-9",
            "quality": "good"}]
    await store_all(db, TelemetryStore(), site, [batch(agent_id(), 0, doc)])
    unit = (await units_of(db, site))["pv-1"]
    assert (unit.firmware, unit.series, unit.serial) == ("2.0.1", "EMU-PV", "PV-9")


async def test_numbers_strings_booleans_and_nulls_keep_their_kind(db: Database) -> None:
    site = await make_site(db)
    ts = iso(T0)
    doc: list[dict[str, object]] = [
        {"device": "u", "point": "a.float", "ts": ts, "value": 12.5, "quality": "good"},
        {"device": "u", "point": "a.int", "ts": ts, "value": 7, "quality": "stale"},
        {"device": "u", "point": "a.bool", "ts": ts, "value": True, "quality": "good"},
        {"device": "u", "point": "a.text", "ts": ts, "value": "tab\there\nnew", "quality": "good"},
        {"device": "u", "point": "a.null", "ts": ts, "value": None, "quality": "comm_lost"},
        {"device": "u", "point": "a.range", "ts": ts, "value": -1e9, "quality": "out_of_range"},
        {"device": "u", "point": "a.long", "ts": ts, "value": "x" * 300, "quality": "good"},
    ]
    await store_all(db, TelemetryStore(), site, [batch(agent_id(), 0, doc)])
    unit = (await units_of(db, site))["u"]
    assert unit.id is not None
    end = T0 + timedelta(seconds=1)
    got: dict[object, PointRow] = {}
    async with db.session() as session:
        for p in doc:
            rows = await points(session, unit.id, str(p["point"]), T0, end)
            assert len(rows) == 1
            got[p["point"]] = rows[0]
    assert got["a.float"].value == 12.5
    assert got["a.float"].text is None
    assert got["a.int"].value == 7.0
    assert got["a.int"].quality is Quality.STALE
    assert got["a.bool"].value == 1.0
    assert got["a.text"].value is None
    assert got["a.text"].text == "tab\there\nnew"
    assert (got["a.null"].value, got["a.null"].text, got["a.null"].quality) == (
        None, None, Quality.COMM_LOST)
    assert got["a.range"].quality is Quality.OUT_OF_RANGE
    assert got["a.range"].value == -1e9
    assert got["a.long"].text == "x" * 200
    assert got["a.float"].ts == T0


async def test_a_primary_key_clash_does_not_lose_the_batch(db: Database) -> None:
    site = await make_site(db)
    agent = agent_id()
    ts = iso(T0)
    clash: list[dict[str, object]] = [
        {"device": "u", "point": "p.a", "ts": ts, "value": 1.0, "quality": "good"},
        {"device": "u", "point": "p.b", "ts": ts, "value": 2.0, "quality": "good"},
        {"device": "u", "point": "p.a", "ts": ts, "value": 3.0, "quality": "good"},  # same key
    ]
    store = TelemetryStore()
    stored = await store_all(db, store, site, [batch(agent, 0, clash)])
    assert stored[0] is not None
    assert await count_rows(db, site) == 2
    # A new batch (new seq) repeating readings already stored, plus one new reading.
    new: dict[str, object] = {"device": "u", "point": "p.c", "ts": ts, "value": 4.0,
                              "quality": "good"}
    again = [*clash[:2], new]
    await store_all(db, store, site, [batch(agent, 1, again)])
    assert await count_rows(db, site) == 3
    unit = (await units_of(db, site))["u"]
    assert unit.id is not None
    async with db.session() as session:
        first = await points(session, unit.id, "p.a", T0, T0 + timedelta(seconds=1))
    assert [r.value for r in first] == [1.0]


async def test_without_a_savepoint_a_clash_asks_for_the_ignoring_path(db: Database) -> None:
    """conflicts="raise" (the worker's mode) streams COPY after COPY as new units appear."""
    site = await make_site(db)
    agent = agent_id()
    store = TelemetryStore()
    # Each batch brings a unit never seen before: the stream stops and restarts twice.
    group = [batch(agent, seq, points_doc([f"n{seq}"], 3, T0)) for seq in range(3)]
    async with db.session() as session:
        out = await store.store_telemetry_many(session, [(site, b) for b in group], "raise")
    assert [r.rows if r else None for r in out] == [3, 3, 3]
    assert await count_rows(db, site) == 9

    again = [batch(agent, 10, points_doc(["n0"], 3, T0)),  # readings stored before, new seq
             batch(agent, 11, points_doc(["n0"], 4, T0))]  # ... and one more point
    items = [(site, b) for b in again]
    if db.is_sqlite:  # SQLite needs no savepoint: "raise" behaves as "savepoint"
        async with db.session() as session:
            await store.store_telemetry_many(session, items, "raise")
    else:
        with pytest.raises(ReadingsClash):
            async with db.session() as session:
                await store.store_telemetry_many(session, items, "raise")
        assert await count_rows(db, site) == 9
        async with db.session() as session:
            out = await store.store_telemetry_many(session, items, "ignore")
        assert [r is not None for r in out] == [True, True]
    assert await count_rows(db, site) == 10


async def test_a_rolled_back_transaction_leaves_no_ghost_ids_in_the_cache(db: Database) -> None:
    site = await make_site(db)
    agent = agent_id()
    store = TelemetryStore()
    b = batch(agent, 0, points_doc(["ghost"], 5, T0))

    async def store_then_fail() -> None:
        async with db.session() as session:
            assert await store.store_telemetry(session, site, b) is not None
            raise RuntimeError("the commit never happens")

    with pytest.raises(RuntimeError):
        await store_then_fail()
    assert store.registry.series_map((site.id or 0, "ghost")) is None
    assert await count_rows(db, site) == 0
    await store_all(db, store, site, [b])
    assert await count_rows(db, site) == 5
    assert store.registry.series_map((site.id or 0, "ghost")) is not None


async def test_two_registries_share_units_and_series(db: Database) -> None:
    site = await make_site(db)
    a, b = TelemetryStore(), TelemetryStore()
    agent = agent_id()
    await store_all(db, a, site, [batch(agent, 0, points_doc(["u1"], 4, T0))])
    await store_all(db, b, site, [batch(agent, 1, points_doc(["u1"], 4, T0 + timedelta(1)))])
    key = (site.id or 0, "u1")
    assert a.registry.series_map(key) == b.registry.series_map(key)
    assert len(await units_of(db, site)) == 1
    assert await count_rows(db, site) == 8


async def test_events_are_stored_once_and_track_comm_loss(db: Database) -> None:
    site = await make_site(db)
    agent = agent_id()
    store = TelemetryStore()

    def events(seq: int, kind: str, device: str | None) -> EventBatch:
        doc = {"agent": agent, "seq": seq, "events": [
            {"ts": iso(T0 + timedelta(seconds=seq)), "kind": kind, "device": device,
             "code": "c1", "severity": "alarm", "detail": {"n": seq}}]}
        return EventBatch.model_validate(doc)

    async with db.session() as session:
        stored = await store.store_events(session, site, events(0, "comm_lost", "u1"))
    assert stored is not None
    unit, ev = stored.events[0]
    assert unit is not None
    assert unit.comm_lost
    assert ev.code == "c1"
    async with db.session() as session:
        assert await store.store_events(session, site, events(0, "comm_lost", "u1")) is None
        assert await store.store_events(session, site, events(1, "agent_started", None))
    assert (await units_of(db, site))["u1"].comm_lost
    async with db.session() as session:
        assert await store.store_events(session, site, events(2, "comm_restored", "u1"))
    assert not (await units_of(db, site))["u1"].comm_lost
    async with db.session() as session:
        rows = (await session.exec(select(Event).where(Event.site_id == site.id))).all()
    assert sorted((e.kind, e.unit_id is None, e.detail) for e in rows) == [
        ("agent_started", True, {"n": 1}),
        ("comm_lost", False, {"n": 0}),
        ("comm_restored", False, {"n": 2}),
    ]


async def test_status_registers_the_agent_and_tracks_presence(db: Database) -> None:
    site, other = await make_site(db), await make_site(db)
    agent = agent_id()
    store = TelemetryStore()
    online = Status(state=AgentState.ONLINE, agent=agent, version="0.3.0", ts=T0,
                    health=Health(points_per_s=12.5, spool_depth=3))
    async with db.session() as session:
        await store.apply_status(session, site, online)
    offline = Status(state=AgentState.OFFLINE, agent=agent, version="0.3.0",
                     ts=T0 - timedelta(minutes=1))  # a will carries its connect time
    async with db.session() as session:
        await store.apply_status(session, site, offline)
        row = (await session.exec(select(Agent).where(Agent.agent_id == agent))).one()
    assert (row.site_id, row.online, row.version, row.last_seen) == (site.id, False, "0.3.0", T0)
    assert row.health["spool_depth"] == 3
    async with db.session() as session:
        assert await store.registry.agent_site(session, agent) == site.id
        with pytest.raises(IngestError, match="belongs to"):
            await store.apply_status(session, other, online)


async def test_rollup_helper_reads_rollup_rows(own_db: Database) -> None:
    db = own_db
    site = await make_site(db)
    await store_all(db, TelemetryStore(), site, [batch(agent_id(), 0, points_doc(["u"], 1, T0))])
    unit = (await units_of(db, site))["u"]
    assert unit.id is not None
    await run_rollups(db, T0 + timedelta(hours=2))
    async with db.session() as session:
        got = await rollups(session, unit.id, "m.P0", 60, T0, T0 + timedelta(hours=1))
        assert await rollups(session, unit.id, "nope", 60, T0, T0 + timedelta(hours=1)) == []
        assert await points(session, unit.id, "nope", T0, T0 + timedelta(hours=1)) == []
    assert [(r.bucket, r.count) for r in got] == [(T0, 1)]


# -- rollups and retention ------------------------------------------------------------------

def readings(device: str, point: str, start: datetime, values: list[float | str],
             step_s: float) -> list[dict[str, object]]:
    return [{"device": device, "point": point, "ts": iso(start + timedelta(seconds=i * step_s)),
             "value": v, "quality": "good"} for i, v in enumerate(values)]


async def rollup_rows(db: Database, unit_id: int, point: str, width: int
                      ) -> list[tuple[object, ...]]:
    async with db.session() as session:
        rows = await rollups(session, unit_id, point, width, T0 - timedelta(days=400),
                             T0 + timedelta(days=400))
    return [(r.bucket, r.min, r.max, r.sum, r.count) for r in rows]


async def test_rollups_per_minute_and_hour_match_hand_computed_values(own_db: Database) -> None:
    db = own_db
    site = await make_site(db)
    start = T0
    # 10 s apart: minute 0 gets 0..5, minute 1 gets 6..11, minute 2 gets 12..13 (then a gap).
    values: list[float | str] = [float(v) for v in range(14)]
    doc = readings("r", "m.v", start, values, 10.0)
    doc += readings("r", "m.s", start, ["text", "more"], 10.0)  # strings are not rolled up
    doc += [{"device": "r", "point": "m.v", "ts": iso(start + timedelta(hours=1, minutes=5)),
             "value": 100.0, "quality": "good"}]
    agent = agent_id()
    store = TelemetryStore()
    await store_all(db, store, site, [batch(agent, 0, doc)])
    unit = (await units_of(db, site))["r"]
    assert unit.id is not None

    # At start + 2 min 30 s: minutes 0 and 1 are closed, minute 2 is not; no hour is closed.
    await run_rollups(db, start + timedelta(minutes=2, seconds=30))
    m = timedelta(minutes=1)
    assert await rollup_rows(db, unit.id, "m.v", 60) == [
        (start, 0.0, 5.0, 15.0, 6),
        (start + m, 6.0, 11.0, 51.0, 6),
    ]
    assert await rollup_rows(db, unit.id, "m.v", 3600) == []
    assert await rollup_rows(db, unit.id, "m.s", 60) == []

    # A late reading for minute 1 (a replay) arrives; the next run recomputes that minute.
    late = [{"device": "r", "point": "m.v", "ts": iso(start + m + timedelta(seconds=5)),
             "value": -4.0, "quality": "good"}]
    await store_all(db, store, site, [batch(agent, 1, late)])
    await run_rollups(db, start + timedelta(hours=2, seconds=1))
    minute_rows = await rollup_rows(db, unit.id, "m.v", 60)
    assert minute_rows == [
        (start, 0.0, 5.0, 15.0, 6),
        (start + m, -4.0, 11.0, 47.0, 7),
        (start + 2 * m, 12.0, 13.0, 25.0, 2),
        (start + timedelta(hours=1, minutes=5), 100.0, 100.0, 100.0, 1),
    ]
    assert await rollup_rows(db, unit.id, "m.v", 3600) == [
        (start, -4.0, 13.0, 87.0, 15),
        (start + timedelta(hours=1), 100.0, 100.0, 100.0, 1),
    ]
    # Running again changes nothing.
    await run_rollups(db, start + timedelta(hours=2, seconds=1))
    assert await rollup_rows(db, unit.id, "m.v", 60) == minute_rows


async def test_retention_deletes_old_raw_readings_and_minute_rollups(own_db: Database) -> None:
    db = own_db
    site = await make_site(db)
    start = T0
    doc = readings("old", "m.v", start, [1.0, 2.0], 30.0)
    doc += readings("old", "m.v", start + timedelta(days=100), [3.0], 30.0)
    store = TelemetryStore()
    await store_all(db, store, site, [batch(agent_id(), 0, doc)])
    unit = (await units_of(db, site))["old"]
    assert unit.id is not None
    await run_rollups(db, start + timedelta(days=101))
    assert len(await rollup_rows(db, unit.id, "m.v", 60)) == 2

    settings = StorageSettings(raw_retention_days=50, rollup_1m_retention_days=120)
    now = start + timedelta(days=130)
    result = await run_retention(db, now, settings)
    assert (result.telemetry, result.rollup_1m, result.batches) == (2, 1, 0)
    async with db.session() as session:
        raw = await points(session, unit.id, "m.v", start - timedelta(days=1), now)
    assert [r.value for r in raw] == [3.0]
    assert [r[0] for r in await rollup_rows(db, unit.id, "m.v", 60)] == [
        start + timedelta(days=100)]
    assert [r[0] for r in await rollup_rows(db, unit.id, "m.v", 3600)] == [
        floor_time(start, 3600), start + timedelta(days=100)]


async def test_retention_walks_only_once_something_can_have_expired(own_db: Database) -> None:
    """The benchmark's finding 2: a walk over every series each minute, with nothing to delete."""
    db = own_db
    site = await make_site(db)
    store = TelemetryStore()
    await store_all(db, store, site, [batch(agent_id(), 0, readings(
        "u", "m.v", T0, [1.0, 2.0], 30.0) + readings("u", "m.v", T0 + timedelta(days=10),
                                                     [3.0], 30.0))])
    unit = (await units_of(db, site))["u"]
    assert unit.id is not None
    settings = StorageSettings(raw_retention_days=5, retention_step_s=3600)
    memo = RetentionMemo()
    now = T0 + timedelta(days=6)
    first = await run_retention(db, now, settings, memo)
    assert (first.walked, first.telemetry) == (True, 2)

    # A late reading from before the cutoff: the next walk takes it, not every minute's run.
    await store_all(db, store, site, [batch(agent_id(), 0, readings(
        "u", "m.v", T0 + timedelta(hours=1), [9.0], 30.0))])
    for minutes in range(1, 60):
        skipped = await run_retention(db, now + timedelta(minutes=minutes), settings, memo)
        assert (skipped.walked, skipped.telemetry) == (False, 0)
    async with db.session() as session:
        raw = await points(session, unit.id, "m.v", T0, now + timedelta(days=5))
    assert [r.value for r in raw] == [9.0, 3.0]

    second = await run_retention(db, now + timedelta(hours=1), settings, memo)
    assert (second.walked, second.telemetry) == (True, 1)
    async with db.session() as session:
        raw = await points(session, unit.id, "m.v", T0, now + timedelta(days=5))
    assert [r.value for r in raw] == [3.0]


def test_floor_time_aligns_to_the_epoch() -> None:
    ts = datetime(2026, 3, 1, 12, 34, 56, 789, tzinfo=UTC)
    assert floor_time(ts, 60) == datetime(2026, 3, 1, 12, 34, tzinfo=UTC)
    assert floor_time(ts, 3600) == datetime(2026, 3, 1, 12, tzinfo=UTC)


def test_the_registry_knows_each_shipped_model() -> None:
    assert Registry().clock is not None
    from server.ingest.registry import series_by_model

    assert series_by_model()[MODEL] == SERIES


async def test_sites_about_to_expire_are_read_again_in_one_query(db: Database) -> None:
    """1,000 small sites must not cost 1,000 site queries per SITE_TTL_S (the fleet bench)."""
    a, b, c = [await make_site(db) for _ in range(3)]
    clock = ManualClock()
    registry = Registry(clock)
    async with db.session() as session:
        assert await registry.site(session, a.code) is not None
        clock.advance(SITE_TTL_S - SITE_AHEAD_S - 1)
        assert await registry.site(session, b.code) is not None
    async with db.session() as session:
        row = (await session.exec(select(Site).where(Site.code == a.code))).one()
        row.timezone = "Asia/Shanghai"
    clock.advance(3)  # a expires within SITE_AHEAD_S, b does not
    queries: list[str] = []
    sa.event.listen(db.engine.sync_engine, "before_cursor_execute",
                    lambda *args: queries.append(args[2]))
    async with db.session() as session:
        assert await registry.site(session, c.code) is not None
    assert len([q for q in queries if "FROM site" in q]) == 1
    clock.advance(SITE_TTL_S - 2)  # b's one read has expired; a was read again with c
    hit, site_a = registry.peek_site(a.code)
    assert hit
    assert site_a is not None
    assert site_a.timezone == "Asia/Shanghai"
    assert registry.peek_site(b.code) == (False, None)  # it was not due then
