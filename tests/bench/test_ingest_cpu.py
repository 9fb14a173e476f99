"""Benchmark: the server's CPU per reading for fleet-shaped batches, decode and fault rules.

The fleet load test (`test_fleet_load.py`) sends many small sites: one batch is one site of
10 units (EMU-BS and EMU-PV alternating), ~705 readings sharing one timestamp per unit, built
by `simulators.load` exactly as `emu sim load` publishes them. This times, in one process and
without broker or database round trips, what the ingest worker spends per reading on them:

- **json.loads** of the payloads (baseline: the least any decoder must do);
- **decode**: `decode_batch` (validation into `TelemetryBatch`, what the worker does);
- **fault rules**: `FaultEngine.on_telemetry` per unit, on units already in memory (after
  first sight, as in the steady state; a SQLite session is open, but readings in the normal
  range make no transition, so nothing is written).

Rounds alternate the three; times are the thread's CPU time, reported as µs per reading
(median of the rounds) and as ratios to json.loads. Run:
`pytest -m bench tests/bench/test_ingest_cpu.py -s` (about 20 s).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from protocols.messages import TelemetryBatch, TelemetryPoint, decode_batch
from server.core.db import Database, migrate_sync
from server.faults import FaultEngine
from server.models import Organisation, Site, Unit
from simulators.load import DEFAULT_PROFILES, batch_template, site_code, unit_readings

pytestmark = pytest.mark.bench

SITES = 20
UNITS = 10
CYCLES = 5
"""Batches per site per round (one poll interval apart)."""
ROUNDS = 7
INTERVAL_S = 10.0
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
T = TypeVar("T")


def payloads(start: int) -> list[bytes]:
    """`CYCLES` batches of each of `SITES` sites, as `emu sim load` publishes them."""
    points, _ = batch_template(unit_readings(DEFAULT_PROFILES, UNITS))
    out = []
    for c in range(start, start + CYCLES):
        stamp = (T0 + timedelta(seconds=c * INTERVAL_S)).isoformat(timespec="milliseconds")
        stamp = stamp.replace("+00:00", "Z")
        for n in range(SITES):
            head = f'{{"agent":"{site_code("cpu", n)}","seq":{c + 1},"sent_at":"{stamp}","points":'
            out.append(head.encode() + points.replace(b"@@TS@@", stamp.encode()) + b"}")
    return out


def cpu(fn: Callable[[], T], into: list[float]) -> T:
    """`fn()`, its thread CPU seconds appended to `into` (after a full collection, so that
    rounds start alike)."""
    gc.collect()
    t0 = time.thread_time()
    out = fn()
    into.append(time.thread_time() - t0)
    return out


class FaultBench:
    """A fault engine with the sites and units of the fleet shape in a SQLite database."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)
        self.engine = FaultEngine()
        self.sites: dict[str, Site] = {}
        self.units: dict[tuple[str, str], Unit] = {}

    async def seed(self) -> None:
        async with self.db.session() as session:
            org = Organisation(name="org-cpu")
            session.add(org)
            await session.flush()
            assert org.id is not None
            for n in range(SITES):
                site = Site(code=site_code("cpu", n), name=f"cpu {n}", org_id=org.id,
                            timezone="UTC")
                session.add(site)
                await session.flush()
                assert site.id is not None
                self.sites[site.code] = site
                for device, _ in unit_readings(DEFAULT_PROFILES, UNITS):
                    series = "EMU-BS" if device.startswith("emu-bs") else "EMU-PV"
                    unit = Unit(site_id=site.id, device=device, series=series)
                    session.add(unit)
                    self.units[site.code, device] = unit
            await session.flush()

    def calls(self, batches: list[TelemetryBatch]) -> list[tuple[Site, Unit, list[TelemetryPoint]]]:
        """The hook calls ingest makes for `batches`: one per unit of each batch."""
        out: list[tuple[Site, Unit, list[TelemetryPoint]]] = []
        for batch in batches:
            site = self.sites[batch.agent]
            by_unit: dict[str, list[TelemetryPoint]] = defaultdict(list)
            for p in batch.points:
                by_unit[p.device].append(p)
            out.extend((site, self.units[site.code, device], points)
                       for device, points in by_unit.items())
        return out

    async def feed(self, calls: list[tuple[Site, Unit, list[TelemetryPoint]]]) -> None:
        """Every unit's readings through the engine in one session, as ingest's hooks do."""
        async with self.db.session() as session:
            for site, unit, points in calls:
                await self.engine.on_telemetry(session, site, unit, points)


async def test_ingest_cpu_per_reading_fleet_shape(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cpu.db'}"
    migrate_sync(url)
    bench = FaultBench(url)
    await bench.seed()
    # first sight (not timed): the units' rule machines are built
    await bench.feed(bench.calls([decode_batch(p) for p in payloads(0)]))
    readings = sum(len(decode_batch(p).points) for p in payloads(0)[:1]) * SITES * CYCLES
    saved = gc.get_threshold()
    gc.set_threshold(50_000, *saved[1:])  # as the ingest worker runs
    loads: list[float] = []
    decode: list[float] = []
    faults: list[float] = []
    try:
        for r in range(ROUNDS):
            data = payloads(CYCLES * (r + 1))
            cpu(partial(list, map(json.loads, data)), loads)
            calls = bench.calls(cpu(partial(list, map(decode_batch, data)), decode))
            gc.collect()
            t0 = time.thread_time()
            await bench.feed(calls)
            faults.append(time.thread_time() - t0)
    finally:
        gc.set_threshold(*saved)
        await bench.db.close()
    us = {name: [s / readings * 1e6 for s in xs]
          for name, xs in (("json.loads", loads), ("decode", decode), ("fault rules", faults))}
    base = statistics.median(us["json.loads"])
    print(f"\n== ingest CPU per reading, fleet shape: {SITES} sites x {UNITS} units, "
          f"{readings // (SITES * CYCLES)} readings a batch, {ROUNDS} rounds of "
          f"{SITES * CYCLES} batches; python {sys.version.split()[0]} ==")
    for name, xs in us.items():
        med = statistics.median(xs)
        rounds = " / ".join(f"{x:.2f}" for x in xs)
        print(f"   {name:12} {med:6.2f} us/reading  ({med / base:5.1f} x json.loads)   "
              f"rounds: {rounds}")
    assert bench.engine is not None
