"""Fleet load: 1,000 sites x 10 units every 10 s through Mosquitto into `emu server` on PostgreSQL.

    pytest -m bench tests/bench/test_fleet_load.py -s

Processes, each its own: a private Mosquitto, `python -m emu server` (roles ingest and
scheduler; `EMU_BENCH_FLEET_SERVERS=2` runs two on one shared subscription), and for each step
`python -m emu sim load` publishing 1,000 sites (one connection each) x 10 units (EMU-BS and
EMU-PV alternating, the readings an agent reports for a simulated unit: 705 per site-batch)
spread evenly over the interval. PostgreSQL is the machine's (a scratch database).

Each step's publisher connects every site (each says `online`, as an agent does) and waits
`SETTLE_S` before its first batch, so a step measures the fleet reporting, not a thousand
agents connecting at once (`EMU_BENCH_FLEET_SETTLE_S=0` measures with that storm). CPU per
process is counted from the first batch to the publisher's end.

Warm-up: one full cycle (the server creates 10,000 units and their series on first sight),
waited for until stored. Then steps at 1x (10 s interval, the issue's case), 2x, 3x, 4x, 6x
... of that rate until p99 lag passes `KNEE_P99_S` or the backlog does not drain: the knee.
Per step: offered and stored readings/s, lag from the publish call to the batch being
visible in the database (p50/p99/max; resolution `POLL_S`), lost batches, CPU per process
(% of one core) and peak RSS, database growth (scaled to a day).
Baseline in the same run: psycopg binary COPY of the same number of rows (the server's own
series, new timestamps) into a copy of the telemetry table; the ratio is the server's
sustained readings/s at the knee over that raw insert rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from tests.bench.agent_bench import CpuMeter, CpuWindow, memory_kb, python_process
from tests.bench.fleet_stack import (
    POLL_S,
    Lags,
    StoredWatcher,
    backend_pids,
    db_size,
    libpq,
    pct,
    private_broker,
    read_publishes,
    seed_sites,
    seed_units,
)
from tests.bench.server_db import RawPg, scratch_pg
from tests.support.waiting import wait_for

pytestmark = pytest.mark.bench

SITES = int(os.environ.get("EMU_BENCH_FLEET_SITES", "1000"))
UNITS = 10
INTERVAL_S = 10.0
PREFIX = "fleet"
SERVERS = int(os.environ.get("EMU_BENCH_FLEET_SERVERS", "1"))
ROLES = os.environ.get("EMU_BENCH_FLEET_ROLES", "ingest,scheduler").split(",")
SCHEDULER = os.environ.get("EMU_BENCH_FLEET_SCHEDULER") == "1"
"""Also run a scheduler-only `emu server` (the compose file's layout with ingest roles)."""
FIRST_STEP_S = float(os.environ.get("EMU_BENCH_FLEET_STEP_S", "60"))
STEP_S = float(os.environ.get("EMU_BENCH_FLEET_NEXT_STEP_S", "30"))
MULTIPLIERS = tuple(float(m) for m in
                    os.environ.get("EMU_BENCH_FLEET_MULTIPLIERS", "1,2,3,4,6,8").split(","))
KNEE_P99_S = 2.0
STOP_P99_S = float(os.environ.get("EMU_BENCH_FLEET_STOP_P99_S", "10"))
WARMUP_DEADLINE_S = 1200.0
DRAIN_DEADLINE_S = 90.0
SETTLE_S = float(os.environ.get("EMU_BENCH_FLEET_SETTLE_S", "15"))
"""Each step's publisher connects its 1,000 sites (each says `online`) this long before its
first batch: the steady state is measured, not a thousand agents connecting at once
(`EMU_BENCH_FLEET_SETTLE_S=0` puts that storm into the step's first seconds)."""
RAW_ROWS = 2_000_000


@dataclass
class Step:
    """One rate and what came of it."""

    multiplier: float
    interval_s: float
    publisher: dict[str, object]
    lags: Lags
    seconds: float
    cpu: dict[str, float | None]
    rss_mib: dict[str, float]
    db_growth_bytes: int
    drained: bool
    machine_busy: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def offered(self) -> float:
        """Readings/s published."""
        return float(self.publisher["points_per_s"] or 0)  # type: ignore[arg-type]

    @property
    def stored_rate(self) -> float:
        """Readings/s stored, over the publishing window."""
        return self.lags.stored * float(self.publisher["points_per_batch"]) / self.seconds  # type: ignore[arg-type]

    @property
    def ok(self) -> bool:
        """Kept up: drained, nothing lost, p99 within the goal."""
        return self.drained and not self.lags.lost and pct(self.lags.visible, 99) < KNEE_P99_S


def _subscribed(log: Path) -> bool:
    return "ingest: subscribed" in log.read_text()


def _fmt_stalls(spells: list[tuple[float, float, float]]) -> str:
    return ", ".join(f"{a:.0f}-{b:.0f} s ({w:.1f})" for a, b, w in spells[:12]) or "none"


def _server_toml(tmp: Path, url: str, broker_port: int, n: int | str,
                 roles: list[str] = ROLES) -> Path:
    path = tmp / f"server-{n}.toml"
    path.write_text(
        f'database_url = "{url}"\nroles = {json.dumps(roles)}\nmigrate_on_start = false\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{broker_port}"\nshared_group = "emu-ingest"\n',
        encoding="utf-8")
    return path


async def _publish(tmp: Path, broker_port: int, interval: float, seconds: float,
                   first_seq: int, name: str, pids: dict[str, int] | None = None,
                   settle: float = 0.0) -> tuple[dict[str, object], Path, CpuWindow | None]:
    """Run `emu sim load`; with `pids`, their CPU from its first batch to its end."""
    record = tmp / f"{name}.csv"
    log = tmp / f"{name}.log"
    meter: CpuMeter | None = None
    async with python_process(name, [
        "emu", "sim", "load", "--url", f"mqtt://127.0.0.1:{broker_port}", "--sites", str(SITES),
        "--units", str(UNITS), "--interval", str(interval), "--duration", str(seconds),
        "--prefix", PREFIX, "--first-seq", str(first_seq), "--record", str(record),
        "--settle", str(settle),
    ], log) as pub:
        if pids is not None:
            await wait_for(lambda: "publishing" in log.read_text() or pub.proc.returncode
                           is not None, settle + 120, f"{name} to connect its sites")
            meter = CpuMeter(pids)
        await wait_for(pub.proc.wait(), seconds + 180, f"{name} to finish")
    window = meter.stop() if meter is not None else None
    text = log.read_text()
    assert pub.proc.returncode == 0, text
    return json.loads(text.strip().splitlines()[-1]), record, window


def _raw_copy_rate(url: str, rows: int) -> float:
    """Rows/s of a binary COPY of `rows` rows (the server's series, new timestamps)."""
    import psycopg

    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS telemetry_raw (LIKE telemetry INCLUDING ALL)")
        series = [r[0] for r in conn.execute("SELECT id FROM series ORDER BY id").fetchall()]
    t0 = datetime(2027, 1, 1, tzinfo=UTC)
    chunk = 20_000
    chunks = []
    for start in range(0, rows, chunk):
        chunks.append([(series[i % len(series)], t0 + timedelta(seconds=10 * (i // len(series))),
                        float(i % 1000), None, 0) for i in range(start, min(rows, start + chunk))])
    raw = RawPg(url)
    try:
        began = time.perf_counter()
        raw.insert(chunks)
        return rows / (time.perf_counter() - began)
    finally:
        raw.close()


async def test_fleet_load(tmp_path: Path) -> None:
    load_before = os.getloadavg()
    with scratch_pg() as url, private_broker(tmp_path) as broker:
        seed_sites(url, PREFIX, SITES)
        seed_units(url, PREFIX, UNITS)
        port = broker.port("1883")
        logs = [tmp_path / f"server-{n}.log" for n in range(SERVERS)]
        async with contextlib.AsyncExitStack() as stack:
            servers = [await stack.enter_async_context(python_process(
                f"server-{n}", ["emu", "server", "-c", str(_server_toml(tmp_path, url, port, n))],
                logs[n])) for n in range(SERVERS)]
            for n, log in enumerate(logs):
                await wait_for(partial(_subscribed, log), 60, f"server {n} to subscribe")
            pids = {f"server-{n}": s.pid for n, s in enumerate(servers)}
            if SCHEDULER:
                toml = _server_toml(tmp_path, url, port, "scheduler", ["scheduler"])
                scheduler = await stack.enter_async_context(python_process(
                    "scheduler", ["emu", "server", "-c", str(toml)],
                    tmp_path / "server-scheduler.log"))
                pids["scheduler"] = scheduler.pid
            pids["mosquitto"] = broker.proc.pid
            with StoredWatcher(url) as watcher:
                began = time.monotonic()
                pub, _, _ = await _publish(tmp_path, port, INTERVAL_S, INTERVAL_S, 1, "warmup")
                await wait_for(lambda: watcher.count() >= int(pub["published"]),  # type: ignore[call-overload]
                               WARMUP_DEADLINE_S, "the warm-up cycle to be stored")
                warmup_s = time.monotonic() - began
                seq = 1 + int(pub["published"]) // SITES  # type: ignore[call-overload]
                pg = {f"pg-{p}": p for p in backend_pids(url)}
                steps: list[Step] = []
                for mult in MULTIPLIERS:
                    step = await _step(tmp_path, url, port, watcher, mult, seq, {**pids, **pg})
                    seq += -(-int(step.publisher["published"]) // SITES)  # type: ignore[call-overload]
                    steps.append(step)
                    _print_step(step)
                    if not step.drained or pct(step.lags.visible, 99) > STOP_P99_S:
                        break
        raw_rate = await asyncio.to_thread(_raw_copy_rate, url, RAW_ROWS)
        size = db_size(url)
    _report(steps, warmup_s, raw_rate, size, load_before)
    assert steps
    assert steps[0].lags.stored > 0


async def _step(tmp: Path, url: str, port: int, watcher: StoredWatcher, mult: float, seq: int,
                pids: dict[str, int]) -> Step:
    interval = INTERVAL_S / mult
    seconds = FIRST_STEP_S if mult == 1.0 else STEP_S
    size0 = db_size(url)[0]
    pub, record, window = await _publish(tmp, port, interval, seconds, seq, f"load-x{mult:g}",
                                         pids, SETTLE_S)
    assert window is not None
    publishes = read_publishes(record)
    drained = await _drain_all(watcher, publishes)
    size1 = db_size(url)[0]
    lags = Lags.of(publishes, watcher.snapshot())
    rss = {name: (memory_kb(pid) or (0, 0))[1] / 1024 for name, pid in pids.items()
           if not name.startswith("pg-")}
    cpu = {k: v for k, v in window.process_cpu_s.items() if not k.startswith("pg-")}
    pg_cpu = [v for k, v in window.process_cpu_s.items() if k.startswith("pg-") and v]
    cpu["postgres backends"] = sum(pg_cpu)
    cpu["publisher"] = float(pub["cpu_s"])  # type: ignore[arg-type]
    return Step(mult, interval, pub, lags, float(pub["end"]) - float(pub["start"]),  # type: ignore[arg-type]
                {k: (None if v is None else 100 * v / window.seconds) for k, v in cpu.items()},
                rss, size1 - size0, drained, window.machine_busy)


async def _drain_all(watcher: StoredWatcher, publishes: list[tuple[str, int, float]]) -> bool:
    wanted = {(a, s) for a, s, _ in publishes}
    try:
        await wait_for(lambda: wanted <= watcher.seen.keys(), DRAIN_DEADLINE_S,
                       "every batch of the step to be stored")
        return True
    except AssertionError:
        return False


def _fmt_lags(values: list[float]) -> str:
    top = max(values, default=float("nan"))
    return f"{pct(values, 50):.2f} / {pct(values, 99):.2f} / {top:.2f}"


def _print_step(s: Step) -> None:
    cpu = ", ".join(f"{k} {v:.0f}%" for k, v in s.cpu.items() if v is not None)
    rss = ", ".join(f"{k} {v:.0f}" for k, v in s.rss_mib.items())
    per_day = s.db_growth_bytes / s.seconds * 86400 / 2**30
    print(f"\nx{s.multiplier:g} (interval {s.interval_s:.2f} s, {s.seconds:.0f} s):"
          f" offered {s.offered:,.0f} readings/s ({s.publisher['batches_per_s']} batches/s),"
          f" stored {s.stored_rate:,.0f}/s; batches {s.lags.published} published,"
          f" {s.lags.stored} stored, {s.lags.lost} not stored {DRAIN_DEADLINE_S:g} s after;"
          f" drained {s.drained}"
          f"\n  lag visible p50/p99/max {_fmt_lags(s.lags.visible)} s;"
          f" spells over 1 s (from, to, worst): {_fmt_stalls(s.lags.stalls())};"
          f" claimed {_fmt_lags(s.lags.claimed)} s; publisher behind <= "
          f"{float(s.publisher['behind_max_s']):.2f} s"  # type: ignore[arg-type]
          f"\n  CPU (% of one core): {cpu}; machine busy "
          f"{100 * (s.machine_busy or 0):.0f}%\n  peak RSS MiB: {rss}"
          f"\n  DB growth {s.db_growth_bytes / 2**20:.0f} MiB in {s.seconds:.0f} s"
          f" = {per_day:.1f} GiB/day at this rate")


def _report(steps: list[Step], warmup_s: float, raw_rate: float, size: tuple[int, int],
            load_before: tuple[float, float, float]) -> None:
    knee = None
    for s in steps:
        if s.ok:
            knee = s
    print(f"\n== fleet load: {SITES} sites x {UNITS} units, {SERVERS} server process(es)"
          f" with roles {', '.join(ROLES)}{' + a scheduler process' if SCHEDULER else ''},"
          f" lag poll {POLL_S} s, settle {SETTLE_S:g} s; load average before"
          f" {load_before[0]:.1f} ==")
    print(f"warm-up (one cycle; units and series pre-seeded, caches cold): {warmup_s:.1f} s")
    for s in steps:
        print(f"x{s.multiplier:g}: offered {s.offered:,.0f}/s stored {s.stored_rate:,.0f}/s"
              f" p99 {pct(s.lags.visible, 99):.2f} s unstored {s.lags.lost}"
              f" {'OK' if s.ok else 'over'}")
    print(f"raw COPY baseline: {raw_rate:,.0f} rows/s ({RAW_ROWS:,} rows)")
    if knee is not None:
        print(f"knee: highest step within p99 < {KNEE_P99_S:g} s and no loss: x{knee.multiplier:g}"
              f" = {knee.stored_rate:,.0f} readings/s; ratio to raw COPY"
              f" {knee.stored_rate / raw_rate:.2f}")
    print(f"database at the end: {size[0] / 2**20:.0f} MiB (telemetry {size[1] / 2**20:.0f} MiB)")
