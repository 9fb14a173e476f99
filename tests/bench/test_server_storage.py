"""Benchmark: the storage layer's insert rate against a raw bulk insert of the same rows.

Subject: `TelemetryStore.store_telemetry_many` with validated `TelemetryBatch`es of 500
readings (5 units x 100 points, one poll cycle), 20 batches (10,000 rows) per transaction, as
the ingest worker calls it (`conflicts="raise"`): claim the batches, map (unit, point) to
series through the caches, bulk insert, move `last_seen`, commit. Baseline: the same number
of rows for the same series, already as tuples, written by the bare driver into an
identically keyed table in the same database: binary COPY through psycopg on PostgreSQL,
`executemany` through sqlite3 on SQLite, also 10,000 rows per transaction. Rounds alternate
subject and baseline; each round writes new timestamps (appends, as live ingest does) to
50 units x 100 points = 5,000 series.

Run: `pytest -m bench tests/bench/test_server_storage.py -s` (PostgreSQL from
EMU_BENCH_PG_URL or EMU_TEST_DATABASE_URL, default 127.0.0.1:5432; skipped if absent).
`EMU_BENCH_PROFILE=1` also prints a cProfile of one subject round.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from protocols.messages import Quality, TelemetryBatch, TelemetryPoint
from server.core.db import Database
from server.models import Site
from server.storage import TelemetryStore
from tests.bench.server_data import make_site
from tests.bench.server_db import RawPg, RawSqlite, scratch_pg, scratch_sqlite

pytestmark = pytest.mark.bench

UNITS = 50
POINTS = 100
UNITS_PER_BATCH = 5
BATCHES_PER_TX = 20
CYCLES_PER_ROUND = 40
"""40 fleet cycles x 5,000 series = 200,000 rows a round."""
ROUNDS = 5
START = datetime(2026, 6, 1, tzinfo=UTC)


@dataclass
class Rounds:
    """Rows per second of each round, subject and baseline."""

    subject: list[float]
    baseline: list[float]


def devices() -> list[str]:
    return [f"unit-{i:03d}" for i in range(UNITS)]


def batches(agent: str, first_seq: int, first_cycle: int, cycles: int) -> list[TelemetryBatch]:
    """Validated batches for `cycles` poll cycles of the fleet (built directly, not parsed)."""
    out: list[TelemetryBatch] = []
    seq = first_seq
    names = devices()
    for cycle in range(first_cycle, first_cycle + cycles):
        ts = START + timedelta(seconds=cycle)
        for i in range(0, UNITS, UNITS_PER_BATCH):
            pts = tuple(
                TelemetryPoint(device=d, point=f"m.P{p}", ts=ts, value=cycle + p * 0.25,
                               quality=Quality.GOOD)
                for d in names[i : i + UNITS_PER_BATCH] for p in range(POINTS)
            )
            out.append(TelemetryBatch(agent=agent, seq=seq, points=pts))
            seq += 1
    return out


def chunks(items: list[TelemetryBatch], size: int) -> Iterator[list[TelemetryBatch]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Bench:
    """One database: the subject (storage layer) and the baseline (raw driver)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.db = Database(url)
        self.store = TelemetryStore()
        self.site: Site | None = None
        self.seq = 0
        self.cycle = 0
        self.sids: dict[tuple[str, str], int] = {}
        self.raw = RawPg(url) if url.startswith("postgresql") else RawSqlite(url)

    async def setup(self) -> None:
        """Site, units and series (a warm-up round of the subject fills the caches)."""
        self.site = await make_site(self.db, "bench-storage")
        await self.subject_round(cycles=2)
        assert self.site.id is not None
        for device in devices():
            series = self.store.registry.series_map((self.site.id, device)) or {}
            for point, sid in series.items():
                self.sids[(device, point)] = sid
        assert len(self.sids) == UNITS * POINTS

    async def subject_round(self, cycles: int = CYCLES_PER_ROUND,
                            profile: cProfile.Profile | None = None) -> float:
        assert self.site is not None
        work = batches("bench-agent", self.seq, self.cycle, cycles)
        self.seq += len(work)
        self.cycle += cycles
        rows = sum(len(b.points) for b in work)
        if profile is not None:
            profile.enable()
        start = time.perf_counter()
        for group in chunks(work, BATCHES_PER_TX):
            async with self.db.session() as session:
                stored = await self.store.store_telemetry_many(
                    session, [(self.site, b) for b in group], conflicts="raise")
            assert all(s is not None for s in stored)
        seconds = time.perf_counter() - start
        if profile is not None:
            profile.disable()
        return rows / seconds

    async def baseline_round(self) -> float:
        names = devices()
        per_tx = BATCHES_PER_TX * UNITS_PER_BATCH * POINTS
        pg = isinstance(self.raw, RawPg)
        rows: list[tuple[object, ...]] = []
        for cycle in range(self.cycle, self.cycle + CYCLES_PER_ROUND):
            ts = START + timedelta(seconds=cycle)
            stamp = ts if pg else ts.replace(tzinfo=None).isoformat(" ", "microseconds")
            rows.extend((self.sids[(d, f"m.P{p}")], stamp, cycle + p * 0.25, None, 0)
                        for d in names for p in range(POINTS))
        self.cycle += CYCLES_PER_ROUND
        parts = [rows[i : i + per_tx] for i in range(0, len(rows), per_tx)]
        start = time.perf_counter()
        await asyncio.to_thread(self.raw.insert, parts)  # type: ignore[arg-type]
        return len(rows) / (time.perf_counter() - start)

    async def run(self) -> Rounds:
        await self.setup()
        result = Rounds([], [])
        for _ in range(ROUNDS):
            result.subject.append(await self.subject_round())
            result.baseline.append(await self.baseline_round())
        if os.environ.get("EMU_BENCH_PROFILE"):
            profile = cProfile.Profile()
            await self.subject_round(profile=profile)
            stats = pstats.Stats(profile).sort_stats("tottime")
            print(f"\n-- profile of one subject round ({self.url.split(':')[0]}) --")
            stats.print_stats(18)
        return result

    async def close(self) -> None:
        self.raw.close()
        await self.db.close()


def report(name: str, rounds: Rounds) -> float:
    """Print the rounds; the ratio is the median of each round's store/raw (adjacent rounds
    share the machine's mood better than medians taken apart)."""
    subject = statistics.median(rounds.subject)
    baseline = statistics.median(rounds.baseline)
    ratio = statistics.median(s / b for s, b in zip(rounds.subject, rounds.baseline,
                                                      strict=True))
    print(f"\n== storage insert rate, {name} ==")
    print(f"   {ROUNDS} rounds of {CYCLES_PER_ROUND * UNITS * POINTS:,} rows, "
          f"{BATCHES_PER_TX * UNITS_PER_BATCH * POINTS:,} rows per transaction, "
          f"alternating; python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print("   round  store rows/s  raw rows/s  ratio")
    for n, (s, b) in enumerate(zip(rounds.subject, rounds.baseline, strict=True), 1):
        print(f"   {n:5}  {s:12,.0f}  {b:10,.0f}  {s / b:5.2f}")
    print(f"   median {subject:12,.0f}  {baseline:10,.0f}  {ratio:5.2f}"
          "  = store/raw (median of the rounds' ratios; goal >= 0.7)")
    print(f"   (1-min load average at the end: {os.getloadavg()[0]:.1f})")
    return ratio


async def measure(url: str) -> Rounds:
    bench = Bench(url)
    try:
        return await bench.run()
    finally:
        await bench.close()


async def test_storage_insert_rate_sqlite(tmp_path: Path) -> None:
    with scratch_sqlite(tmp_path) as url:
        ratio = report("SQLite (executemany)", await measure(url))
    assert ratio > 0


async def test_storage_insert_rate_postgresql() -> None:
    with scratch_pg() as url:
        ratio = report("PostgreSQL (binary COPY)", await measure(url))
    assert ratio > 0
