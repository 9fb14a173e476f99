"""`/units/{id}/telemetry` (raw and rollups, ranges, limits) and `/units/{id}/points`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from server.core.db import Database
from tests.server.test_api_common import (
    NOW,
    POINT,
    RAW_COUNT,
    RAW_START,
    RAW_STEP,
    ROLLUP_COUNT,
    World,
    client_for,
    seed_world,
)


@pytest.fixture
async def world(db: Database) -> World:
    """A freshly seeded world."""
    return await seed_world(db)


async def series(world: World, **params: Any) -> dict[str, Any]:
    """GET the own unit's telemetry with `params` as the own customer, asserting 200."""
    async with client_for(world.app, world.own.token) as client:
        response = await client.get(f"/api/v1/units/{world.own.unit_id}/telemetry",
                                    params={"point": POINT, **params})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_raw_defaults_to_the_last_day(world: World) -> None:
    body = await series(world)
    assert body["rollup"] == "raw"
    assert body["truncated"] is False
    assert [s["value"] for s in body["samples"]] == [float(i) for i in range(RAW_COUNT)]
    assert body["samples"][0]["quality"] == "stale"
    assert body["samples"][1]["quality"] == "good"
    assert body["end"].startswith(NOW.isoformat()[:19])


async def test_raw_range_is_half_open(world: World) -> None:
    start = RAW_START + 10 * RAW_STEP
    end = RAW_START + 20 * RAW_STEP
    body = await series(world, start=start.isoformat(), end=end.isoformat())
    assert [s["value"] for s in body["samples"]] == [float(i) for i in range(10, 20)]


async def test_raw_limit_keeps_the_latest_rows(world: World) -> None:
    body = await series(world, limit=5)
    assert body["truncated"] is True
    assert [s["value"] for s in body["samples"]] == [55.0, 56.0, 57.0, 58.0, 59.0]


async def test_one_minute_rollup(world: World) -> None:
    body = await series(world, rollup="1m")
    samples = body["samples"]
    assert len(samples) == ROLLUP_COUNT
    first = samples[0]
    assert first["min"] == 0.0
    assert first["max"] == 5.0
    assert first["count"] == 6
    assert first["value"] == pytest.approx(2.5)
    assert first["quality"] is None


async def test_one_minute_rollup_includes_the_bucket_holding_start(world: World) -> None:
    start = RAW_START + timedelta(minutes=2, seconds=30)
    body = await series(world, rollup="1m", start=start.isoformat(),
                        end=(RAW_START + timedelta(minutes=4)).isoformat())
    assert [s["min"] for s in body["samples"]] == [2.0, 3.0]


async def test_one_hour_rollup(world: World) -> None:
    body = await series(world, rollup="1h")
    assert [(s["count"], s["value"]) for s in body["samples"]] == [(60, pytest.approx(29.5))]


async def test_empty_range_gives_no_samples(world: World) -> None:
    body = await series(world, start=(NOW - timedelta(days=9)).isoformat(),
                        end=(NOW - timedelta(days=8)).isoformat())
    assert body["samples"] == []


@pytest.mark.parametrize(
    ("params", "status", "fragment"),
    [
        ({"point": "nope"}, 404, "no point"),
        ({"start": NOW.isoformat(), "end": NOW.isoformat()}, 422, "before"),
        ({"start": "yesterday"}, 422, "start"),
        ({"rollup": "5m"}, 422, "rollup"),
        ({"limit": 0}, 422, "limit"),
        ({"limit": 10_001}, 422, "limit"),
        ({"point": ""}, 422, "point"),
        ({"point": "a\u0000b"}, 422, "point"),
    ],
)
async def test_bad_telemetry_requests(
    world: World, params: dict[str, Any], status: int, fragment: str
) -> None:
    async with client_for(world.app, world.own.token) as client:
        response = await client.get(f"/api/v1/units/{world.own.unit_id}/telemetry",
                                    params={"point": POINT, **params})
    assert response.status_code == status
    assert fragment in response.json()["detail"]


async def test_point_is_required(world: World) -> None:
    async with client_for(world.app, world.own.token) as client:
        response = await client.get(f"/api/v1/units/{world.own.unit_id}/telemetry")
    assert response.status_code == 422
    assert "query.point: Field required" in response.json()["detail"]


async def test_latest_value_per_point(world: World) -> None:
    async with client_for(world.app, world.own.token) as client:
        response = await client.get(f"/api/v1/units/{world.own.unit_id}/points")
    assert response.status_code == 200
    points = {p["point"]: p for p in response.json()}
    assert points[POINT]["value"] == float(RAW_COUNT - 1)
    assert points[POINT]["ts"].startswith((RAW_START + (RAW_COUNT - 1) * RAW_STEP).isoformat()[:19])
    assert points[POINT]["quality"] == "good"
    note = points[f"note-{world.own.marker}"]
    assert note["text"] == world.own.marker
    assert note["value"] is None
