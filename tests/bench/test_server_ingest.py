"""Benchmark: end to end, MQTT batches in -> readings stored, through the ingest worker.

A publisher process (`tests.bench.server_mqtt publish`) sends 600 telemetry batches of 500
readings (300,000 readings, JSON as the agent writes it) at QoS 1 to Mosquitto; the ingest
worker (in this process, as `emu server` runs it: paho thread, decoder and writer tasks,
manual acknowledgements after each commit) validates and stores them in a scratch PostgreSQL
database. The rate is readings / (first publish -> last reading committed).

Baseline, alternating with it round by round: the same publisher to a bare paho subscriber
process that only counts the messages (QoS 1, acknowledged on receipt): what the broker and
the network stack carry on this machine, with no validation and no database.

Besides the rates, each round records CPU seconds of this process (the worker), of the
publisher (its own count, building the payloads included), of Mosquitto and of all
PostgreSQL processes (from /proc; other users of that server count too), to show where the time
goes. `EMU_BENCH_PROFILE=1` adds a cProfile of the worker's event loop for one round.

Run: `pytest -m bench tests/bench/test_server_ingest.py -s` (Mosquitto from EMU_TEST_MQTT_URL,
default mqtt://127.0.0.1:1883; PostgreSQL as in `server_db`). Goal: >= 100,000 readings/s.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import pstats
import secrets
import socket
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from server.core.config import load_server_settings
from server.core.db import Database
from server.ingest.worker import IngestWorker
from tests.bench.server_data import make_site
from tests.bench.server_db import scratch_pg, scratch_sqlite
from tests.bench.server_mqtt import POINTS, UNITS, UNITS_PER_BATCH
from tests.support.waiting import wait_for

pytestmark = pytest.mark.bench

BATCHES = 600
READINGS = BATCHES * UNITS_PER_BATCH * POINTS
ROUNDS = 3
ROUND_TIMEOUT_S = 120.0
CYCLES_PER_ROUND = BATCHES * UNITS_PER_BATCH // UNITS


def broker_url() -> str:
    url = os.environ.get("EMU_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 1883), 2).close()
    except OSError:
        pytest.skip(f"no MQTT broker at {url} (the benchmark needs Mosquitto)")
    return url


def cpu_by_name(names: Iterable[str]) -> dict[str, float]:
    """User + system CPU seconds of all processes whose command name is in `names`."""
    wanted = set(names)
    out = dict.fromkeys(wanted, 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        if comm in wanted:
            fields = text.rpartition(")")[2].split()
            out[comm] += (int(fields[11]) + int(fields[12])) / tick
    return out


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Round:
    """One timed round."""

    readings_per_s: float
    cpu: dict[str, float] = field(default_factory=dict)


async def run_module(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.server_mqtt", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def result_of(proc: asyncio.subprocess.Process) -> dict[str, float]:
    assert proc.stdout is not None
    line = await wait_for(proc.stdout.readline(), ROUND_TIMEOUT_S, "a helper's result")
    if not line:
        _, err = await proc.communicate()
        raise AssertionError(f"helper failed: {err.decode()[-2000:]}")
    return dict(json.loads(line))


class IngestBench:
    """The worker against one database, and the bare-subscriber baseline."""

    def __init__(self, url: str, broker: str) -> None:
        self.url = url
        self.broker = broker
        self.db = Database(url)
        self.agent = f"bench-{secrets.token_hex(3)}"
        self.seq = 0
        self.cycle = 0
        self.worker: IngestWorker | None = None
        self.task: asyncio.Task[None] | None = None
        self.code = ""

    async def start(self) -> None:
        site = await make_site(self.db, f"bench-ingest-{secrets.token_hex(3)}")
        self.code = site.code
        settings = load_server_settings(
            None, database_url=self.url, roles=("ingest",),
            mqtt={"url": self.broker, "shared_group": f"bench-{secrets.token_hex(3)}"},
        )
        self.worker = IngestWorker(settings, self.db, site=site.code)
        self.task = asyncio.create_task(self.worker.run())
        await wait_for(self.worker.ready, 20, "the worker to subscribe")
        await self.publish_round(batches=20)  # first sight: units and series are created

    async def publish(self, batches: int) -> asyncio.subprocess.Process:
        proc = await run_module("publish", self.broker, self.code, self.agent, str(self.seq),
                                str(batches), str(self.cycle))
        self.seq += batches
        self.cycle += batches * UNITS_PER_BATCH // UNITS + 1
        return proc

    async def publish_round(self, batches: int = BATCHES,
                            profile: cProfile.Profile | None = None) -> Round:
        assert self.worker is not None
        target = self.worker.stats.points + batches * UNITS_PER_BATCH * POINTS
        names = ("mosquitto", "postgres")
        before, own = cpu_by_name(names), own_cpu()
        proc = await self.publish(batches)
        if profile is not None:
            profile.enable()
        def stored() -> bool:
            if proc.returncode not in (None, 0):
                raise AssertionError(f"the publisher failed with {proc.returncode}")
            return self.worker is not None and self.worker.stats.points >= target

        try:
            await wait_for(stored, ROUND_TIMEOUT_S, "the readings to be stored")
        finally:
            if profile is not None:
                profile.disable()
        done = time.time()
        timing = await result_of(proc)
        await proc.wait()
        after, own_after = cpu_by_name(names), own_cpu()
        assert self.worker.stats.errors == 0
        assert self.worker.stats.invalid == 0
        cpu = {k: max(0.0, after[k] - before[k]) for k in names}  # an exited process drops out
        cpu["worker"] = own_after - own
        cpu["publisher"] = timing["cpu"]
        return Round(batches * UNITS_PER_BATCH * POINTS / (done - timing["start"]), cpu)

    async def baseline_round(self) -> Round:
        topic = f"emu/v1/{self.code}-sink/telemetry"
        sink = await run_module("sink", self.broker, topic, str(BATCHES))
        await result_of(sink)  # subscribed
        names = ("mosquitto",)
        before = cpu_by_name(names)
        proc = await run_module("publish", self.broker, f"{self.code}-sink", self.agent, "0",
                                str(BATCHES), "0")
        timing = await result_of(proc)
        got = await result_of(sink)
        await asyncio.gather(proc.wait(), sink.wait())
        after = cpu_by_name(names)
        cpu = {k: max(0.0, after[k] - before[k]) for k in names}
        cpu["publisher"] = timing["cpu"]
        return Round(READINGS / (got["last"] - timing["start"]), cpu)

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        await self.db.close()


def report(name: str, subject: list[Round], baseline: list[Round], groups: int = 0,
           peak: int = 0) -> float:
    ratio = statistics.median(s.readings_per_s / b.readings_per_s
                              for s, b in zip(subject, baseline, strict=True))
    print(f"\n== ingest end to end, {name} ==")
    print(f"   {ROUNDS} rounds of {BATCHES} batches x {UNITS_PER_BATCH * POINTS} readings"
          f" ({READINGS:,}), QoS 1, alternating; python {sys.version.split()[0]},"
          f" {os.cpu_count()} cores")
    print("   round  stored readings/s  bare subscriber readings/s  ratio"
          "   CPU s: worker  postgres  mosquitto  publisher")
    for n, (s, b) in enumerate(zip(subject, baseline, strict=True), 1):
        c = s.cpu
        print(f"   {n:5}  {s.readings_per_s:17,.0f}  {b.readings_per_s:26,.0f}"
              f"  {s.readings_per_s / b.readings_per_s:5.2f}"
              f"   {c['worker']:13.2f}  {c.get('postgres', 0):8.2f}  {c['mosquitto']:9.2f}"
              f"  {c['publisher']:9.2f}")
    best = statistics.median(s.readings_per_s for s in subject)
    worker_us = statistics.median(s.cpu["worker"] / READINGS * 1e6 for s in subject)
    pg_us = statistics.median(s.cpu.get("postgres", 0.0) / READINGS * 1e6 for s in subject)
    print(f"   (worker: {groups} transactions, at most {peak} messages unacknowledged;"
          f" CPU per reading: worker {worker_us:.1f} us, database {pg_us:.1f} us, i.e. one"
          f" worker process on a core of its own: ~{1e6 / worker_us:,.0f} readings/s;"
          f" 1-min load average at the end {os.getloadavg()[0]:.1f})")
    print(f"   median stored {best:,.0f} readings/s (goal >= 100,000); ratio to the bare"
          f" subscriber {ratio:.2f}")
    return best


async def measure(url: str, broker: str) -> tuple[list[Round], list[Round], int, int]:
    bench = IngestBench(url, broker)
    subject: list[Round] = []
    baseline: list[Round] = []
    try:
        await bench.start()
        for _ in range(ROUNDS):
            subject.append(await bench.publish_round())
            baseline.append(await bench.baseline_round())
        if os.environ.get("EMU_BENCH_PROFILE"):
            profile = cProfile.Profile()
            await bench.publish_round(profile=profile)
            print(f"\n-- profile of the worker's event loop, one round ({url.split(':')[0]}) --")
            pstats.Stats(profile).sort_stats("tottime").print_stats(22)
    finally:
        await bench.close()
    assert bench.worker is not None
    return subject, baseline, bench.worker.stats.groups, bench.worker.stats.peak_inflight


async def test_ingest_end_to_end_postgresql() -> None:
    broker = broker_url()
    with scratch_pg() as url:
        best = report("PostgreSQL", *await measure(url, broker))
    assert best > 0


async def test_ingest_end_to_end_sqlite(tmp_path: Path) -> None:
    broker = broker_url()
    with scratch_sqlite(tmp_path) as url:
        best = report("SQLite", *await measure(url, broker))
    assert best > 0
