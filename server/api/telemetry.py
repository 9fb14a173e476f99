"""`/api/v1/units/{id}/telemetry` (a time series) and `/api/v1/units/{id}/points` (latest values).

Queries go straight to the narrow tables: a unit's point is a `Series`; raw readings are
`Telemetry` rows keyed (series_id, ts), rollups are `Rollup` rows keyed (series_id, width_s,
bucket), so every range query here is one index range scan.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Query
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.messages import Quality
from server.api.deps import CurrentUser, IdPath, NowDep, SessionDep, get_visible, id_of
from server.errors import InvalidInput, NotFound
from server.models import Rollup, Series, Telemetry, Unit
from server.schemas import PointLatest, RollupName, Sample, TimeSeries, UTCTime

router = APIRouter(prefix="/units", tags=["telemetry"])

DEFAULT_SPAN = timedelta(hours=24)
MAX_SAMPLES = 10_000
ROLLUP_WIDTH_S = {"1m": 60, "1h": 3600}
QUALITY_NAMES = tuple(q.value for q in Quality)
"""Stored quality codes 0..3, in the order of `protocols.messages.Quality`."""

PointName = Annotated[
    str, Query(min_length=1, max_length=96, pattern=r"^[^\x00]+$", description="point name")
]


def quality_name(code: int | None) -> str | None:
    """The API's name for a stored quality code."""
    if code is None:
        return None
    return QUALITY_NAMES[code] if 0 <= code < len(QUALITY_NAMES) else str(code)


async def _series(session: AsyncSession, unit_id: int, point: str) -> Series:
    series = (
        await session.exec(
            select(Series).where(Series.unit_id == unit_id).where(Series.point == point)
        )
    ).first()
    if series is None:
        raise NotFound(f"unit {unit_id} has no point {point!r}")
    return series


async def _raw(
    session: AsyncSession, series_id: int, start: datetime, end: datetime, limit: int
) -> list[Sample]:
    rows = await session.exec(
        select(Telemetry)
        .where(Telemetry.series_id == series_id)
        .where(col(Telemetry.ts) >= start)
        .where(col(Telemetry.ts) < end)
        .order_by(col(Telemetry.ts).desc())
        .limit(limit + 1)
    )
    return [
        Sample(ts=r.ts, value=r.value, text=r.text, quality=quality_name(r.quality))
        for r in rows.all()
    ]


async def _rollup(
    session: AsyncSession, series_id: int, width_s: int, start: datetime, end: datetime,
    limit: int,
) -> list[Sample]:
    rows = await session.exec(
        select(Rollup)
        .where(Rollup.series_id == series_id)
        .where(Rollup.width_s == width_s)
        .where(col(Rollup.bucket) > start - timedelta(seconds=width_s))
        .where(col(Rollup.bucket) < end)
        .order_by(col(Rollup.bucket).desc())
        .limit(limit + 1)
    )
    return [
        Sample(ts=r.bucket, value=r.sum / r.count if r.count else None,
               min=r.min, max=r.max, count=r.count)
        for r in rows.all()
    ]


@router.get("/{unit_id}/telemetry", response_model=TimeSeries)
async def get_telemetry(
    session: SessionDep,
    user: CurrentUser,
    now: NowDep,
    unit_id: IdPath,
    point: PointName,
    start: Annotated[UTCTime | None, Query(description="inclusive, ISO-8601; default end - 24 h")]
    = None,
    end: Annotated[UTCTime | None, Query(description="exclusive, ISO-8601; default now")] = None,
    rollup: RollupName = "raw",
    limit: Annotated[int, Query(ge=1, le=MAX_SAMPLES, description="latest N rows")] = 1000,
) -> TimeSeries:
    """One point of one unit over [start, end): raw readings or 1 min / 1 h rollups.

    Returns the latest `limit` rows of the range, oldest first; `truncated` says whether older
    rows were left out. A rollup row's `value` is the bucket's mean.
    """
    unit = await get_visible(session, user, Unit, unit_id, col(Unit.site_id))
    end = end or now
    start = start or end - DEFAULT_SPAN
    if start >= end:
        raise InvalidInput("start must be before end")
    series_id = id_of(await _series(session, unit_id, point))
    if rollup == "raw":
        samples = await _raw(session, series_id, start, end, limit)
    else:
        samples = await _rollup(session, series_id, ROLLUP_WIDTH_S[rollup], start, end, limit)
    truncated = len(samples) > limit
    samples = samples[:limit]
    samples.reverse()
    return TimeSeries(unit_id=id_of(unit), point=point, rollup=rollup, start=start, end=end,
                      truncated=truncated, samples=samples)


@router.get("/{unit_id}/points", response_model=list[PointLatest])
async def get_points(session: SessionDep, user: CurrentUser, unit_id: IdPath) -> list[PointLatest]:
    """Every point of a unit with its latest reading."""
    await get_visible(session, user, Unit, unit_id, col(Unit.site_id))
    latest = (
        select(func.max(Telemetry.ts))
        .where(col(Telemetry.series_id) == col(Series.id))
        .correlate(Series)
        .scalar_subquery()
    )
    stmt = (
        select(col(Series.point), Telemetry)
        .select_from(Series)
        .outerjoin(
            Telemetry,
            sa.and_(col(Telemetry.series_id) == col(Series.id), col(Telemetry.ts) == latest),
        )
        .where(Series.unit_id == unit_id)
        .order_by(col(Series.point))
    )
    rows = (await session.exec(stmt)).all()
    return [
        PointLatest(point=point, ts=None, value=None, text=None, quality=None)
        if row is None
        else PointLatest(point=point, ts=row.ts, value=row.value, text=row.text,
                         quality=quality_name(row.quality))
        for point, row in rows
    ]
