"""Periodic storage jobs: telemetry rollups (1 min, 1 h) and retention.

Pure async functions of a `Database` and the time `now` (injected, so tests and the scheduler
decide what "now" is); the scheduler loop calls them every `storage.rollup_interval_s`.

Rollups: a bucket is rolled up once it is closed (its end is not after `now`). Each run
starts from the newest bucket already stored for that width (the watermark), minus a
look-back of closed buckets that are recomputed (upserted), so that readings arriving a
little late still count. Readings that arrive after their bucket's look-back has passed (the
replay of a long outage) stay out of the rollups. 1 min buckets come from raw readings
(numeric values only: min, max, sum, count), 1 h buckets from the 1 min buckets. Work is cut
into transactions of at most `SERIES_CHUNK` series and `SPAN[width]` of time.

Retention walks every series (one index range delete per series chunk), which costs in
proportion to the series, not to what expired: 17 % of the server's CPU at 1,000 sites when it
ran every minute (docs/benchmarks.md, fleet load, finding 2). So a `RetentionMemo` remembers
the cutoffs of the last walk (nothing older is kept) and the next walk waits until the cutoff
has moved `StorageSettings.retention_step_s` past them: a row outlives its retention by at most
that step, and the walk runs once per step instead of every rollup interval.

Every query addresses telemetry and rollups through their primary keys (series first, then
time), with series ids listed in the statement, so both SQLite and PostgreSQL do index range
scans instead of reading the whole table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from server.core.config import StorageSettings
from server.core.db import Database
from server.models import UTCDateTime

MINUTE, HOUR = 60, 3600
WIDTHS = (MINUTE, HOUR)
LOOKBACK_BUCKETS = {MINUTE: 2, HOUR: 1}
"""Closed buckets recomputed on every run, for readings that arrive late."""
SPAN = {MINUTE: timedelta(hours=6), HOUR: timedelta(days=7)}
"""Most time one rollup transaction covers (a first run over a long history is cut up)."""
SERIES_CHUNK = 1000
"""Most series one statement names."""

_TS = UTCDateTime()


@dataclass
class RollupResult:
    """Rollup rows written (inserted or recomputed) per width, and the buckets covered."""

    rows: dict[int, int] = field(default_factory=dict)
    covered: dict[int, tuple[datetime, datetime]] = field(default_factory=dict)


@dataclass
class RetentionResult:
    """Rows deleted by one retention run."""

    telemetry: int = 0
    rollup_1m: int = 0
    batches: int = 0
    walked: bool = True
    """False when nothing could have expired since the last walk, so none ran."""


@dataclass
class RetentionMemo:
    """The cutoffs of this process's last retention walk: nothing older was kept."""

    raw: datetime | None = None
    minute: datetime | None = None

    def due(self, raw: datetime, minute: datetime, step: timedelta) -> bool:
        """Whether either cutoff moved at least `step` past the last walk's (or none ran)."""
        if self.raw is None or self.minute is None:
            return True
        return raw - self.raw >= step or minute - self.minute >= step


def floor_time(ts: datetime, width_s: int) -> datetime:
    """Start of the `width_s` bucket holding `ts` (buckets are aligned to the Unix epoch)."""
    epoch = int(ts.timestamp())
    return datetime.fromtimestamp(epoch - epoch % width_s, UTC)


# The bucket start of a timestamp, epoch-aligned, width `:w` seconds. PostgreSQL computes it
# from the epoch; SQLite keeps UTC as 'YYYY-MM-DD HH:MM:SS.ffffff' text (see `UTCDateTime`),
# so its bucket is rebuilt in exactly that shape, or comparisons with stored values would fail.
_UPSERT = (
    ' ON CONFLICT (series_id, width_s, bucket) DO UPDATE SET "min" = excluded."min", '
    '"max" = excluded."max", "sum" = excluded."sum", "count" = excluded."count"'
)
_INSERT = 'INSERT INTO rollup (series_id, width_s, bucket, "min", "max", "sum", "count") '
_FROM_RAW = {
    "postgresql": (
        "SELECT t.series_id, :w, to_timestamp(floor(extract(epoch from t.ts) / :w) * :w) AS b,"
        " min(t.value), max(t.value), sum(t.value), count(t.value) FROM telemetry t"
        " WHERE t.series_id IN :ids AND t.ts >= :start AND t.ts < :end"
        " AND t.value IS NOT NULL GROUP BY 1, b"
    ),
    "sqlite": (
        "SELECT t.series_id, :w, strftime('%Y-%m-%d %H:%M:%S',"
        " (CAST(strftime('%s', t.ts) AS INTEGER) / :w) * :w, 'unixepoch') || '.000000' AS b,"
        " min(t.value), max(t.value), sum(t.value), count(t.value) FROM telemetry t"
        " WHERE t.series_id IN :ids AND t.ts >= :start AND t.ts < :end"
        " AND t.value IS NOT NULL GROUP BY 1, b"
    ),
}
_FROM_MINUTES = {
    "postgresql": (
        "SELECT r.series_id, :w, to_timestamp(floor(extract(epoch from r.bucket) / :w) * :w)"
        " AS b, min(r.min), max(r.max), sum(r.sum), sum(r.count) FROM rollup r"
        " WHERE r.series_id IN :ids AND r.width_s = :src AND r.bucket >= :start"
        " AND r.bucket < :end GROUP BY 1, b"
    ),
    "sqlite": (
        "SELECT r.series_id, :w, strftime('%Y-%m-%d %H:%M:%S',"
        " (CAST(strftime('%s', r.bucket) AS INTEGER) / :w) * :w, 'unixepoch') || '.000000' AS b,"
        " min(r.min), max(r.max), sum(r.sum), sum(r.count) FROM rollup r"
        " WHERE r.series_id IN :ids AND r.width_s = :src AND r.bucket >= :start"
        " AND r.bucket < :end GROUP BY 1, b"
    ),
}
_WATERMARK = (
    "SELECT max((SELECT max(r.bucket) FROM rollup r"
    " WHERE r.series_id = s.id AND r.width_s = :w)) AS m FROM series s"
)
_OLDEST_RAW = (
    "SELECT min((SELECT min(t.ts) FROM telemetry t WHERE t.series_id = s.id)) AS m FROM series s"
)
_OLDEST_MINUTE = (
    "SELECT min((SELECT min(r.bucket) FROM rollup r WHERE r.series_id = s.id"
    " AND r.width_s = :src)) AS m FROM series s"
)
_DELETE_RAW = "DELETE FROM telemetry WHERE series_id IN :ids AND ts < :cutoff"
_DELETE_ROLLUP = "DELETE FROM rollup WHERE series_id IN :ids AND width_s = :w AND bucket < :cutoff"
_DELETE_BATCHES = "DELETE FROM ingestedbatch WHERE received_at < :cutoff"


def _upsert_sql(dialect: str, width_s: int) -> sa.TextClause:
    sources = _FROM_RAW if width_s == MINUTE else _FROM_MINUTES
    source = sources["postgresql" if dialect == "postgresql" else "sqlite"]
    return sa.text(_INSERT + source + _UPSERT).bindparams(
        sa.bindparam("ids", expanding=True),
        sa.bindparam("start", type_=_TS),
        sa.bindparam("end", type_=_TS),
    )


async def _series_ids(conn: AsyncConnection) -> list[int]:
    return list((await conn.execute(sa.text("SELECT id FROM series ORDER BY id"))).scalars())


def _chunks(ids: Sequence[int], size: int = SERIES_CHUNK) -> list[Sequence[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


async def _watermark(conn: AsyncConnection, width_s: int) -> datetime | None:
    """Newest bucket stored for `width_s` (one index probe per series, not a table scan)."""
    stmt = sa.text(_WATERMARK).columns(sa.column("m", _TS))
    value: datetime | None = (await conn.execute(stmt, {"w": width_s})).scalar()
    return value


async def _oldest_source(conn: AsyncConnection, width_s: int) -> datetime | None:
    """Oldest reading (1 min) or 1 min bucket (1 h) there is to roll up."""
    sql = _OLDEST_RAW if width_s == MINUTE else _OLDEST_MINUTE
    stmt = sa.text(sql).columns(sa.column("m", _TS))
    value: datetime | None = (await conn.execute(stmt, {"src": MINUTE})).scalar()
    return value


async def run_rollups(db: Database, now: datetime) -> RollupResult:
    """Roll up every closed bucket not yet rolled up (plus the look-back), 1 min then 1 h."""
    result = RollupResult()
    for width in WIDTHS:
        end = floor_time(now, width)
        async with db.engine.connect() as conn:
            dialect = conn.dialect.name
            mark = await _watermark(conn, width)
            if mark is None:
                oldest = await _oldest_source(conn, width)
                start = None if oldest is None else floor_time(oldest, width)
            else:
                start = mark - timedelta(seconds=width * (LOOKBACK_BUCKETS[width] - 1))
            ids = await _series_ids(conn)
        result.rows[width] = 0
        if start is None or start >= end:
            continue
        result.covered[width] = (start, end)
        stmt = _upsert_sql(dialect, width)
        t0 = start
        while t0 < end:
            t1 = min(end, t0 + SPAN[width])
            async with db.engine.begin() as conn:
                for chunk in _chunks(ids):
                    done = await conn.execute(stmt, {
                        "w": width, "src": MINUTE, "ids": list(chunk), "start": t0, "end": t1,
                    })
                    result.rows[width] += max(done.rowcount, 0)
            t0 = t1
    return result


async def run_retention(db: Database, now: datetime, storage: StorageSettings,
                        memo: RetentionMemo | None = None) -> RetentionResult:
    """Delete raw readings and 1 min rollups past their retention; 1 h rollups stay.

    Also forgets ingested-batch keys older than the raw retention: a replay that old would
    only bring back readings that are deleted anyway. With a `memo` (the scheduler keeps one),
    nothing is walked until a cutoff moved `retention_step_s` past the last walk's.
    """
    raw_cutoff = now - timedelta(days=storage.raw_retention_days)
    minute_cutoff = now - timedelta(days=storage.rollup_1m_retention_days)
    if memo is not None and not memo.due(raw_cutoff, minute_cutoff,
                                         timedelta(seconds=storage.retention_step_s)):
        return RetentionResult(walked=False)
    result = RetentionResult()
    delete_raw = sa.text(_DELETE_RAW).bindparams(
        sa.bindparam("ids", expanding=True), sa.bindparam("cutoff", type_=_TS))
    delete_minute = sa.text(_DELETE_ROLLUP).bindparams(
        sa.bindparam("ids", expanding=True), sa.bindparam("cutoff", type_=_TS))
    async with db.engine.connect() as conn:
        ids = await _series_ids(conn)
    for chunk in _chunks(ids):
        async with db.engine.begin() as conn:
            done = await conn.execute(delete_raw, {"ids": list(chunk), "cutoff": raw_cutoff})
            result.telemetry += max(done.rowcount, 0)
            done = await conn.execute(
                delete_minute, {"ids": list(chunk), "w": MINUTE, "cutoff": minute_cutoff})
            result.rollup_1m += max(done.rowcount, 0)
    async with db.engine.begin() as conn:
        done = await conn.execute(
            sa.text(_DELETE_BATCHES).bindparams(sa.bindparam("cutoff", type_=_TS)),
            {"cutoff": raw_cutoff},
        )
        result.batches = max(done.rowcount, 0)
    if memo is not None:
        memo.raw, memo.minute = raw_cutoff, minute_cutoff
    return result
