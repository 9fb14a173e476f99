"""Benchmark: replaying the spool after a 10-minute outage, the agent's uplink against raw paho.

The spool is filled with what 100 EMU-BS units polled every second produce in 10 minutes,
through the agent's own `Batcher` and `Spool` (see `tests.bench.agent_replay_runner`), rather
than by waiting 10 real minutes. Then, in rounds that alternate, a fresh copy of it is drained
by each of two processes against the broker (Mosquitto on 127.0.0.1:1883 if it answers, else
the embedded amqtt):

- the subject, the agent's `Uplink` on the spool: QoS 1, 50 in flight, each batch deleted
  from the spool once acknowledged;
- the baseline, a bare paho client that has loaded every payload into memory first and
  publishes them in order at QoS 1 with the same 50 in flight.

A subscriber in this process counts messages, points and distinct `seq`s. Drain time runs from
the first batch taken for publishing to the last PUBACK (the spool is then free); the
subscriber's last message gives the end-to-end time. Its counts are reported, not required:
Mosquitto drops what a subscriber falls more than `max_queued_messages` behind on, and no
Python subscriber keeps up with raw paho here.

Run with the other benchmarks: `pytest -m bench tests/bench -s`. Asserts sanity only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import sqlite3
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt
import pytest

from protocols.messages import Encoding
from tests.bench.agent_bench import (
    CountingSubscriber,
    bench_broker,
    clear_status,
    fmt,
    python_process,
    unique_site,
)
from tests.bench.agent_replay_runner import fill_spool
from tests.support.broker import BrokerInfo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.bench

UNITS = 100
OUTAGE_S = 600
ROUNDS = 3
DRAIN_TIMEOUT_S = 120.0
DELIVERY_TIMEOUT_S = 30.0
QUIET_S = 1.0
DEFAULT_SPOOL_MB = 256.0
"""`SpoolSettings.max_mb`'s default."""


@dataclass(frozen=True)
class Drain:
    """One drain of the outage spool."""

    batches: int
    acked_s: float
    received_s: float | None
    empty_s: float | None
    cpu_s: float | None
    messages: int
    distinct: int
    points: int

    def per_s(self, amount: float) -> float:
        """`amount` per second of drain time (to the last PUBACK)."""
        return amount / self.acked_s


async def drain(
    tmp: Path, master: Path, mode: str, n: int, broker: BrokerInfo, batches: int
) -> Drain:
    """Copy the outage spool, drain the copy with `mode` (uplink or raw), count what arrives."""
    copy = tmp / f"{mode}-{n}.db"
    await asyncio.to_thread(shutil.copyfile, master, copy)
    site = unique_site("bench-replay")
    result = tmp / f"{mode}-{n}.json"
    args = ["tests.bench.agent_replay_runner", mode, "--spool", str(copy), "--broker",
            broker.url, "--site", site, "--result", str(result)]
    try:
        with CountingSubscriber(broker, f"emu/v1/{site}/telemetry") as sub:
            async with python_process(mode, args, tmp / f"{mode}-{n}.log") as proc:
                code = await wait_for(proc.proc.wait(), DRAIN_TIMEOUT_S, f"the {mode} drain")
                assert code == 0, f"{mode} exited with {code}: {await proc.output()}"
            await wait_for(lambda: delivered(sub, batches), DELIVERY_TIMEOUT_S,
                           f"all {batches} batches at the subscriber, or a quiet second")
            got = json.loads(await asyncio.to_thread(result.read_text, encoding="utf-8"))
            start = float(got["start"])
            return Drain(
                batches=int(got["batches"]), acked_s=float(got["acked"]) - start,
                received_s=None if sub.last_at is None else sub.last_at - start,
                empty_s=None if got.get("empty") is None else float(got["empty"]) - start,
                cpu_s=got.get("cpu_s"), messages=sub.messages, distinct=len(sub.seqs),
                points=sub.points,
            )
    finally:
        if mode == "uplink":
            await asyncio.to_thread(clear_status, broker, site)
        await asyncio.to_thread(_remove_spool, copy)


def delivered(sub: CountingSubscriber, batches: int) -> bool:
    """Every batch arrived, or nothing came for `QUIET_S` (the broker dropped the rest).

    Mosquitto drops messages for a subscriber more than `max_queued_messages` (1000 by
    default) behind; a Python subscriber cannot keep up with raw paho's rate, so the baseline's
    delivery is reported, not required.
    """
    if len(sub.seqs) >= batches:
        return True
    return sub.last_at is not None and time.time() - sub.last_at > QUIET_S


def _remove_spool(path: Path) -> None:
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)


def compressed_ratio(spool: Path) -> float:
    """How much `uplink.compress = true` would shrink a typical batch (the batcher's envelope)."""
    db = sqlite3.connect(spool)
    try:
        (raw,) = db.execute("SELECT payload FROM outbox ORDER BY id LIMIT 1").fetchone()
    finally:
        db.close()
    body = base64.b64encode(zlib.compress(raw)).decode("ascii")
    packed = json.dumps({"encoding": Encoding.ZLIB_JSON.value, "body": body}).encode()
    return len(packed) / len(raw)


def _median(drains: Sequence[Drain], key: Callable[[Drain], float | None]) -> float | None:
    values = [key(d) for d in drains]
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def report(
    batches: int, points: int, size: int, fill_s: float, ratio_z: float,
    uplink: Sequence[Drain], raw: Sequence[Drain],
) -> float:
    """Print the spool, every round and the medians; return the uplink/raw points/s ratio."""
    mb = size / 1e6
    per_min = size / (OUTAGE_S / 60)
    default_min = DEFAULT_SPOOL_MB * 1024 * 1024 / per_min
    print(f"\n== agent spool replay: {UNITS} x EMU-BS, {OUTAGE_S / 60:g}-minute outage ==")
    print(
        f"   spool: {batches} batches, {points} points ({points / (UNITS * OUTAGE_S):.1f}"
        f" per unit-cycle), {mb:.0f} MB of payload, filled in {fill_s:.1f} s; the default"
        f" {DEFAULT_SPOOL_MB:g} MiB spool holds {default_min:.1f} min of this fleet"
        f" (compress = true: batches x{ratio_z:.2f}, ~{default_min / ratio_z:.0f} min)"
    )
    print(
        f"   {ROUNDS} rounds, alternating uplink/raw, a fresh copy of the spool each; python"
        f" {sys.version.split()[0]}, paho-mqtt {paho.mqtt.__version__}, {os.cpu_count()} cores"
    )
    print("   subject  round  drain s  batches/s  points/s   MB/s  end-to-end s  spool empty s"
          "  CPU s  received msgs/seqs/points")
    rows = [("uplink", n, d) for n, d in enumerate(uplink, 1)]
    rows += [("raw", n, d) for n, d in enumerate(raw, 1)]
    for name, n, d in rows:
        print(
            f"   {name:7}  {n:5}  {d.acked_s:7.2f}  {d.per_s(d.batches):9.0f}"
            f"  {d.per_s(points):8.0f}  {d.per_s(mb):5.0f}  {fmt(d.received_s, '.2f'):>12}"
            f"  {fmt(d.empty_s, '.2f'):>13}  {fmt(d.cpu_s, '.2f'):>5}"
            f"  {d.messages}/{d.distinct}/{d.points}"
        )
    up_pts = statistics.median(d.per_s(points) for d in uplink)
    raw_pts = statistics.median(d.per_s(points) for d in raw)
    ratio = up_pts / raw_pts
    up_b = statistics.median(d.per_s(d.batches) for d in uplink)
    raw_b = statistics.median(d.per_s(d.batches) for d in raw)
    label = f"{OUTAGE_S / 60:g}-min outage, {UNITS} units"
    print(f"replay points/s ({label}): uplink {up_pts:.0f}  raw paho: {raw_pts:.0f}"
          f"  ratio {ratio:.2f}")
    print(f"replay batches/s ({label}): uplink {up_b:.0f}  raw paho: {raw_b:.0f};"
          f" 10 min of outage replayed in {_median(uplink, lambda d: d.acked_s) or 0:.1f} s"
          f" (raw {_median(raw, lambda d: d.acked_s) or 0:.1f} s), i.e."
          f" {OUTAGE_S / (_median(uplink, lambda d: d.acked_s) or 1):.0f}x real time")
    up_cpu = _median(uplink, lambda d: d.cpu_s)
    raw_cpu = _median(raw, lambda d: d.cpu_s)
    print(f"replay CPU ({label}): uplink {fmt(up_cpu, '.2f')} s, raw paho {fmt(raw_cpu, '.2f')} s"
          f" = {fmt(None if up_cpu is None else up_cpu / batches * 1e6)} vs"
          f" {fmt(None if raw_cpu is None else raw_cpu / batches * 1e6)} us per batch")
    return ratio


async def test_agent_spool_replay_after_outage(tmp_path: Path) -> None:
    """Drain 10 minutes of 100 units' spooled telemetry: the agent's uplink against raw paho."""
    master = tmp_path / "outage.db"
    t0 = time.perf_counter()
    batches, points, size = await fill_spool(master, units=UNITS, seconds=OUTAGE_S)
    fill_s = time.perf_counter() - t0
    ratio_z = await asyncio.to_thread(compressed_ratio, master)
    uplink: list[Drain] = []
    raw: list[Drain] = []
    with bench_broker() as broker:
        for n in range(1, ROUNDS + 1):
            uplink.append(await drain(tmp_path, master, "uplink", n, broker, batches))
            raw.append(await drain(tmp_path, master, "raw", n, broker, batches))
    ratio = report(batches, points, size, fill_s, ratio_z, uplink, raw)
    for d in (*uplink, *raw):
        assert d.batches == batches
        assert 0 < d.distinct <= batches
    for d in uplink:
        assert d.empty_s is not None, "the uplink did not empty the spool"
    assert ratio > 0
