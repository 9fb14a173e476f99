"""Benchmark: the agent polling 100 simulated units against a bare pymodbus loop, same reads.

One `emu sim` process serves 100 EMU-BS units (unit ids 1..100 on one port). Rounds alternate
between two subjects, each in its own process:

- the agent, `python -m emu agent -c agent.toml`: 100 modbus-tcp devices, uplink to the broker
  (Mosquitto on 127.0.0.1:1883 if it answers, else the embedded amqtt), spool in tmp_path,
  health file every 0.5 s;
- the baseline, `python -m tests.bench.agent_bare_loop`: 100 `AsyncModbusTcpClient`
  connections doing the agent's read plan (4 reads per unit) on the same fixed schedule, and
  nothing else.

Two schedules: the issue's 1 s interval (both should keep up, so the ratio is ~1 and the
interesting figure is CPU), and back to back (interval 0.01 s, every slot overruns), which
compares maximum polling throughput. Counters come from the agent's `agent-health.json` and
the baseline's stats file (each stamped with its own time), CPU and memory from /proc, and a
subscriber counts the points that actually reach the broker. Points/s of the baseline is its
cycles/s times the points per cycle the agent emitted in the same run.

Run with the other benchmarks: `pytest -m bench tests/bench -s`. Asserts sanity only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pymodbus
import pytest

from tests.bench.agent_bench import (
    CountingSubscriber,
    CpuMeter,
    Proc,
    Stopped,
    bench_broker,
    clear_status,
    fmt,
    memory_kb,
    python_process,
    sim_args,
    unique_site,
    wait_listening,
)
from tests.support.broker import BrokerInfo
from tests.support.net import LOOPBACK, free_tcp_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.bench

UNITS = 100
PROFILE = "EMU-BS"
READY_TIMEOUT_S = 60.0
HEALTH_INTERVAL_S = 0.5
CAPACITY_INTERVAL_S = 0.01
CAPACITY_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Schedule:
    """One benchmark case: poll interval, rounds and their length."""

    title: str
    interval: float
    rounds: int
    round_s: float
    warmup_s: float
    stop_timeout: float


STEADY = Schedule("1 s schedule", 1.0, rounds=2, round_s=15.0, warmup_s=3.0, stop_timeout=10.0)
CAPACITY = Schedule(
    "back to back (capacity)", CAPACITY_INTERVAL_S, rounds=3, round_s=8.0, warmup_s=3.0,
    stop_timeout=CAPACITY_STOP_TIMEOUT_S,
)


@dataclass(frozen=True)
class Counts:
    """Cumulative counters of one subject at one moment (stamped by its own clock)."""

    ts: float
    cycles: int
    reads: int
    points: int
    skipped: int
    failed: int
    errors: int
    delivered: int | None = None
    """Points the subscriber had received when this was read (the agent only)."""


def slope(samples: Sequence[Counts], key: Callable[[Counts], int | None]) -> float | None:
    """Least-squares rate of a counter over the samples, per second.

    A fit over every sample of the window rather than (last - first) / time, because all
    units poll in phase: at a 1 s interval the counters rise in steps of a whole fleet-cycle,
    and a difference of two samples would be off by up to one step.
    """
    values = [key(c) for c in samples]
    if any(v is None for v in values):
        return None
    t0 = samples[0].ts
    times = [c.ts - t0 for c in samples]
    fit = statistics.linear_regression(times, [float(v or 0) for v in values])
    return fit.slope


@dataclass(frozen=True)
class Round:
    """One timed window of one subject: rates fitted over its samples, totals, CPU, memory."""

    seconds: float
    samples: int
    cycles_per_s: float
    reads_per_s: float
    points_per_s: float
    skipped_per_s: float
    failed: int
    errors: int
    cpu_pct: float | None
    sim_cpu_pct: float | None
    machine_busy: float | None
    rss_mib: float | None
    hwm_mib: float | None
    delivered_per_s: float | None = None
    spool_batches: int | None = None
    stopped: Stopped | None = None

    @property
    def cpu_us_per_cycle(self) -> float | None:
        """The subject's CPU time per unit-cycle."""
        if self.cpu_pct is None or not self.cycles_per_s:
            return None
        return self.cpu_pct / 100 / self.cycles_per_s * 1e6


def _round(samples: Sequence[Counts], **extra: Any) -> Round:
    first, last = samples[0], samples[-1]
    return Round(
        seconds=last.ts - first.ts, samples=len(samples),
        cycles_per_s=slope(samples, lambda c: c.cycles) or 0.0,
        reads_per_s=slope(samples, lambda c: c.reads) or 0.0,
        points_per_s=slope(samples, lambda c: c.points) or 0.0,
        skipped_per_s=slope(samples, lambda c: c.skipped) or 0.0,
        delivered_per_s=slope(samples, lambda c: c.delivered),
        failed=last.failed - first.failed, errors=last.errors - first.errors, **extra,
    )


async def sample_window(
    path: Path, proc: Proc, seconds: float, parse: Callable[[dict[str, Any]], Counts],
    extra: Callable[[Counts], Counts] | None = None,
) -> list[Counts]:
    """Every new document `proc` writes to `path` for `seconds`, parsed (and completed)."""
    samples: list[Counts] = []
    deadline = time.monotonic() + seconds
    after = time.time()
    while True:
        doc = await fresh(path, after, proc, f"a fresh {path.name}")
        counts = parse(doc)
        samples.append(extra(counts) if extra else counts)
        after = counts.ts
        if time.monotonic() >= deadline:
            return samples


# -- the agent --------------------------------------------------------------------------------
def agent_toml(site: str, state_dir: Path, broker: BrokerInfo, port: int, interval: float) -> str:
    """An agent.toml for `UNITS` EMU-BS units on 127.0.0.1:`port`, ids 1..UNITS."""
    lines = [
        f"site = {json.dumps(site)}",
        f"state_dir = {json.dumps(str(state_dir))}",
        "[broker]",
        f'url = "mqtt://{broker.host}:{broker.port}"',
        "[uplink]",
        f"health_interval_s = {HEALTH_INTERVAL_S}",
        "[spool]",
        'path = "spool.db"',
    ]
    for n in range(1, UNITS + 1):
        lines += [
            "[[devices]]", f'name = "bs-{n}"', 'protocol = "modbus-tcp"',
            f'host = "{LOOPBACK}"', f"port = {port}", f"unit_id = {n}",
            f'profile = "{PROFILE}"', f"poll_interval_s = {interval}",
        ]
    return "\n".join(lines) + "\n"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON in `path`, or None if it is not there yet."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return data


def read_if_changed(path: Path, seen: list[int]) -> dict[str, Any] | None:
    """`read_json`, but None without parsing while the file's mtime is still `seen[0]`."""
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    if mtime == seen[0]:
        return None
    seen[0] = mtime
    return read_json(path)


def health_counts(h: dict[str, Any]) -> Counts:
    """Sum the per-device counters of an agent health document."""
    devs = h["devices"].values()
    ts = h["ts"]
    return Counts(
        ts=_epoch(ts), cycles=sum(d["cycles"] for d in devs), reads=sum(d["reads"] for d in devs),
        points=int(h["points_total"]), skipped=sum(d["skipped_slots"] for d in devs),
        failed=sum(d["failed_cycles"] for d in devs),
        errors=sum(d["timeouts"] + d["exceptions"] + d["malformed"] + d["errors"] for d in devs),
    )


def _epoch(iso_ts: str) -> float:
    return datetime.fromisoformat(iso_ts).timestamp()


async def fresh(path: Path, after: float, proc: Proc, what: str) -> dict[str, Any]:
    """The first document in `path` stamped later than `after` (epoch seconds)."""
    seen = [0]

    async def newer() -> dict[str, Any] | None:
        await proc.check_alive()
        doc = await asyncio.to_thread(read_if_changed, path, seen)
        if doc is None:
            return None
        ts = doc["ts"]
        stamp = _epoch(ts) if isinstance(ts, str) else float(ts)
        return doc if stamp > after else None

    doc: dict[str, Any] | None = await wait_for(newer, READY_TIMEOUT_S, what)
    assert doc is not None
    return doc


async def agent_round(
    tmp: Path, n: int, broker: BrokerInfo, sim: Proc, port: int, sched: Schedule
) -> Round:
    """Start the agent, warm up, measure one window, stop it."""
    state = tmp / f"agent-{n}"
    state.mkdir()
    site = unique_site("bench-poll")
    config = state / "agent.toml"
    config.write_text(agent_toml(site, state, broker, port, sched.interval), encoding="utf-8")
    health = state / "agent-health.json"
    args = ["emu", "agent", "-c", str(config)]
    with CountingSubscriber(broker, f"emu/v1/{site}/telemetry") as sub:
        async with python_process("emu agent", args, state / "agent.log",
                                  stop_timeout=sched.stop_timeout) as agent:

            async def ready() -> bool:
                await agent.check_alive()
                h = await asyncio.to_thread(read_json, health)
                return bool(h and h["uplink"]["connected"] and len(h["devices"]) == UNITS
                            and all(d["cycles"] >= 2 for d in h["devices"].values()))

            await wait_for(ready, READY_TIMEOUT_S, "the agent to poll every unit")
            await asyncio.sleep(sched.warmup_s)
            meter = CpuMeter({"subject": agent.pid, "sim": sim.pid})

            def delivered(c: Counts) -> Counts:
                return dataclasses.replace(c, delivered=sub.snapshot()[2])

            samples = await sample_window(health, agent, sched.round_s, health_counts,
                                          delivered)
            window = meter.stop()
            mem = memory_kb(agent.pid)
            last = await asyncio.to_thread(read_json, health)
    await asyncio.to_thread(clear_status, broker, site)
    return _round(
        samples,
        cpu_pct=window.percent("subject"), sim_cpu_pct=window.percent("sim"),
        machine_busy=window.machine_busy,
        rss_mib=mem[0] / 1024 if mem else None, hwm_mib=mem[1] / 1024 if mem else None,
        spool_batches=int(last["spool"]["batches"]) if last else None,
        stopped=agent.stopped,
    )


# -- the bare loop ----------------------------------------------------------------------------
def bare_counts(doc: dict[str, Any]) -> Counts:
    """Counters of the bare loop's stats file (points are filled in later)."""
    return Counts(ts=float(doc["ts"]), cycles=doc["cycles"], reads=doc["reads"], points=0,
                  skipped=doc["skipped_slots"], failed=0, errors=doc["errors"])


async def bare_round(tmp: Path, n: int, sim: Proc, port: int, sched: Schedule) -> Round:
    """Start the bare loop, warm up, measure one window, stop it."""
    stats = tmp / f"bare-{n}.json"
    args = ["tests.bench.agent_bare_loop", "--port", str(port), "--units", str(UNITS),
            "--profile", PROFILE, "--interval", str(sched.interval), "--stats", str(stats)]
    async with python_process("bare pymodbus loop", args, tmp / f"bare-{n}.log") as bare:

        async def ready() -> bool:
            await bare.check_alive()
            doc = await asyncio.to_thread(read_json, stats)
            return bool(doc and doc["connected"] == UNITS and doc["cycles"] >= 2 * UNITS)

        await wait_for(ready, READY_TIMEOUT_S, "the bare loop to poll every unit")
        await asyncio.sleep(sched.warmup_s)
        meter = CpuMeter({"subject": bare.pid, "sim": sim.pid})
        samples = await sample_window(stats, bare, sched.round_s, bare_counts)
        window = meter.stop()
        mem = memory_kb(bare.pid)
    return _round(
        samples,
        cpu_pct=window.percent("subject"), sim_cpu_pct=window.percent("sim"),
        machine_busy=window.machine_busy,
        rss_mib=mem[0] / 1024 if mem else None, hwm_mib=mem[1] / 1024 if mem else None,
        stopped=bare.stopped,
    )


# -- report -----------------------------------------------------------------------------------
def _median(rounds: Sequence[Round], key: Callable[[Round], float | None]) -> float | None:
    values = [key(r) for r in rounds]
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def report(sched: Schedule, agent: Sequence[Round], bare: Sequence[Round]) -> float:
    """Print every round and the medians; return agent points/s over baseline points/s."""
    points_per_cycle = statistics.median(r.points_per_s / r.cycles_per_s for r in agent)
    reads_per_cycle = statistics.median(r.reads_per_s / r.cycles_per_s for r in agent)
    title = f"agent polling: {UNITS} x {PROFILE}, {sched.title}"
    print(f"\n== {title} ==")
    print(
        f"   interval {sched.interval:g} s, {sched.rounds} rounds x {sched.round_s:g} s each,"
        f" alternating agent/bare after {sched.warmup_s:g} s warm-up; rates fitted over the"
        f" samples of each window; python {sys.version.split()[0]}, pymodbus"
        f" {pymodbus.__version__}, {os.cpu_count()} cores"
    )
    print(f"   agent: {reads_per_cycle:.2f} reads/cycle, {points_per_cycle:.1f} points/cycle"
          f" (bare-loop points/s = its cycles/s x {points_per_cycle:.1f})")
    print("   subject  round  cycles/s  reads/s  points/s  delivered/s  skipped/s  errors"
          "  CPU %  us/cycle  sim CPU %  machine %  RSS MiB  peak MiB  stop")
    rows = [("agent", n, r) for n, r in enumerate(agent, 1)]
    rows += [("bare", n, r) for n, r in enumerate(bare, 1)]
    for name, n, r in rows:
        pts = r.points_per_s if name == "agent" else r.cycles_per_s * points_per_cycle
        busy = None if r.machine_busy is None else 100 * r.machine_busy
        print(
            f"   {name:7}  {n:5}  {r.cycles_per_s:8.0f}  {r.reads_per_s:7.0f}  {pts:8.0f}"
            f"  {fmt(r.delivered_per_s):>11}  {r.skipped_per_s:9.0f}  {r.errors + r.failed:6}"
            f"  {fmt(r.cpu_pct):>5}  {fmt(r.cpu_us_per_cycle):>8}  {fmt(r.sim_cpu_pct):>9}"
            f"  {fmt(busy):>9}  {fmt(r.rss_mib):>7}  {fmt(r.hwm_mib):>8}"
            f"  {r.stopped.describe() if r.stopped else '-'}"
        )
    agent_pts = statistics.median(r.points_per_s for r in agent)
    bare_pts = statistics.median(r.cycles_per_s for r in bare) * points_per_cycle
    ratio = agent_pts / bare_pts
    label = f"{UNITS} units, {sched.title}"
    print(f"agent points/s ({label}): {agent_pts:.0f}  bare pymodbus loop: {bare_pts:.0f}"
          f"  ratio {ratio:.2f}")
    agent_cpu = _median(agent, lambda r: r.cpu_pct)
    bare_cpu = _median(bare, lambda r: r.cpu_pct)
    agent_us = _median(agent, lambda r: r.cpu_us_per_cycle)
    bare_us = _median(bare, lambda r: r.cpu_us_per_cycle)
    us_ratio = None if agent_us is None or bare_us is None else agent_us / bare_us
    print(f"CPU ({label}): agent {fmt(agent_cpu)} %, bare {fmt(bare_cpu)} % of one core;"
          f" per unit-cycle agent {fmt(agent_us)} us, bare {fmt(bare_us)} us"
          f"  ratio {fmt(us_ratio, '.2f')}")
    rss = _median(agent, lambda r: r.rss_mib)
    bare_rss = _median(bare, lambda r: r.rss_mib)
    delivered = _median(agent, lambda r: r.delivered_per_s)
    print(f"agent ({label}): RSS {fmt(rss)} MiB (bare {fmt(bare_rss)} MiB), delivered to the"
          f" broker {fmt(delivered)} points/s, spool at the end"
          f" {[r.spool_batches for r in agent]} batches")
    print(f"agent shutdown ({label}): "
          + "; ".join(r.stopped.describe() for r in agent if r.stopped))
    return ratio


async def compare(tmp_path: Path, sched: Schedule) -> tuple[float, list[Round], list[Round]]:
    """Serve the units, alternate agent and bare-loop rounds, report."""
    port, control = free_tcp_port(), free_tcp_port()
    agent_rounds: list[Round] = []
    bare_rounds: list[Round] = []
    with bench_broker() as broker:
        async with python_process("emu sim", sim_args(UNITS, port, control, PROFILE),
                                  tmp_path / "sim.log") as sim:
            await wait_listening(sim, port)
            for n in range(1, sched.rounds + 1):
                agent_rounds.append(await agent_round(tmp_path, n, broker, sim, port, sched))
                bare_rounds.append(await bare_round(tmp_path, n, sim, port, sched))
    ratio = report(sched, agent_rounds, bare_rounds)
    return ratio, agent_rounds, bare_rounds


def _sane(rounds: Sequence[Round]) -> None:
    for r in rounds:
        assert r.cycles_per_s > 0, "no unit-cycles in a round"
        assert r.errors == 0, f"{r.errors} read errors in a round"
        assert r.failed == 0, f"{r.failed} failed cycles in a round"


async def test_agent_polling_1s_schedule(tmp_path: Path) -> None:
    """100 units at 1 s: both keep up; CPU, RSS, reads per cycle, and the throughput ratio."""
    ratio, agent, bare = await compare(tmp_path, STEADY)
    _sane(agent)
    _sane(bare)
    assert ratio > 0


async def test_agent_polling_capacity(tmp_path: Path) -> None:
    """100 units back to back: maximum polling throughput, agent against the bare loop."""
    ratio, agent, bare = await compare(tmp_path, CAPACITY)
    _sane(agent)
    _sane(bare)
    assert ratio > 0
