"""The replay benchmark's parts: fill a spool as an outage would, and drain it two ways.

`fill_spool` writes what `units` EMU-BS units polled every second produce in `seconds`, through
the agent's own `Batcher` and `Spool`: each unit's samples are the ones the agent's
coordinator would emit for the simulator's registers (same plan, same decoding, same
qualities), so the payloads have the real size and shape. A manual clock moves one second per
fleet-cycle, so batches close as in the running agent: full ones at `batch_max_points`, the
remainder when it is `batch_max_age_s` old.

Draining runs in its own process (so that it has a core and a GIL of its own):

    python -m tests.bench.agent_replay_runner uplink --spool S --broker URL --site SITE --result R
    python -m tests.bench.agent_replay_runner raw    --spool S --broker URL --site SITE --result R

`uplink` is the subject: the agent's `Uplink` on that spool, until every batch is acknowledged
and deleted. `raw` is the baseline: a bare paho client that first loads every payload into
memory, then publishes them in order at QoS 1 with the same in-flight window. Both write JSON
to R: `start` (epoch seconds when the first batch was taken for publishing), `acked` (when the
last PUBACK arrived), `empty` (uplink only: when the spool was empty), `batches`, and `cpu_s`,
the process's CPU time (all threads) from `start` to `acked`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pymodbus.simulator import SimData, SimDevice

from agent.batcher import Batcher
from agent.config import AgentSettings
from agent.spool import Row, Spool
from agent.uplink import Uplink
from protocols.clock import ManualClock
from protocols.messages import Quality
from protocols.planner import plan_reads
from protocols.profiles import load_profile
from protocols.registers import PointType, RegisterImage, Table, Value, decode_image
from tests.bench.raw_server import raw_devices

OUTAGE_START = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
POLL_EVERY_S = 0.005
"""Seconds between two looks at the uplink's counters while it drains."""
DRAIN_TIMEOUT_S = 300.0
_NOT_TELEMETRY = (PointType.SUNSSF, PointType.PAD)

Sample = tuple[str, Value | None, Quality]


def unit_samples(profile_name: str, units: int) -> list[list[Sample]]:
    """Per unit, the samples one poll cycle of the agent yields for the simulator's registers."""
    profile = load_profile(profile_name)
    plan = plan_reads(profile.poll_points, max_gap=profile.max_gap)
    out = []
    for dev in raw_devices(profile_name, units):
        blocks = {Table.HOLDING: _block(dev, 2), Table.INPUT: _block(dev, 3)}
        image = RegisterImage()
        for req in plan:
            base, values = blocks[req.table]
            start = req.address - base
            image.put(req.table, req.address, values[start : start + req.count])
        readings = decode_image(profile.poll_points, image)
        samples: list[Sample] = []
        for p in profile.poll_points:
            r = readings.get(p.name)
            if p.type in _NOT_TELEMETRY or r is None or r.value is None:
                continue
            samples.append((p.name, r.value, Quality.OUT_OF_RANGE if r.out_of_range
                            else Quality.GOOD))
        out.append(samples)
    return out


def _block(dev: SimDevice, index: int) -> tuple[int, list[int]]:
    """(first address, registers) of a `SimUnit` device's holding (2) or input (3) block."""
    data = cast(list[SimData], cast(Any, dev.simdata)[index])[0]
    return data.address, cast(list[int], data.values)


async def fill_spool(
    path: Path, *, units: int, seconds: int, profile: str = "EMU-BS",
    max_points: int = 1000, max_age_s: float = 1.0,
) -> tuple[int, int, int]:
    """Spool `seconds` of `units` units' telemetry; returns (batches, points, payload bytes)."""
    clock = ManualClock(OUTAGE_START)
    spool = Spool(path, max_bytes=1 << 40)  # hold all of it; the bench reports the size
    await spool.open()
    try:
        batcher = Batcher(spool, "bench-replay", max_points=max_points, max_age_s=max_age_s,
                          clock=clock)
        fleet = unit_samples(profile, units)
        for _ in range(seconds):
            ts = clock.now()
            for n, samples in enumerate(fleet, 1):
                batcher.add_samples(f"bs-{n}", ts, samples)
            await batcher.flush(force=False)  # the full batches
            clock.advance(1.0)
            await batcher.flush(force=False)  # the remainder, now max_age_s old
        await batcher.flush(force=True)
        batches, points, _ = await spool.depth()
    finally:
        await spool.close()
    return batches, points, await asyncio.to_thread(payload_bytes, path)


def payload_bytes(path: Path) -> int:
    """The payload bytes in a spool file, as the spool's own size limit counts them."""
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()[0])
    finally:
        db.close()


# -- the subject: the agent's uplink -----------------------------------------------------------
class _TimedSpool(Spool):
    """A spool that notes when the uplink first asks it for batches to publish."""

    first_peek: float | None = None
    cpu_at_first_peek: float | None = None

    async def peek(self, after_id: int, limit: int) -> list[Row]:
        if self.first_peek is None:
            self.first_peek = time.time()
            self.cpu_at_first_peek = time.process_time()
        return await super().peek(after_id, limit)


async def drain_uplink(spool_path: Path, broker_url: str, site: str) -> dict[str, Any]:
    """Run `Uplink` on the spool until every batch is acknowledged and the spool is empty."""
    settings = AgentSettings(site=site, state_dir=spool_path.parent,
                             broker={"url": broker_url}, spool={"path": spool_path})
    spool = _TimedSpool(spool_path, max_bytes=1 << 40)
    await spool.open()
    batches, _, _ = await spool.depth()
    uplink = Uplink(settings, spool)
    task = asyncio.create_task(uplink.run(), name="uplink")
    uplink.notify()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_TIMEOUT_S
    acked = empty = cpu_s = None
    try:
        while loop.time() < deadline:
            if acked is None and uplink.stats.acked >= batches:
                acked = time.time()
                cpu_s = time.process_time() - (spool.cpu_at_first_peek or 0.0)
            if acked is not None and (await spool.depth())[0] == 0:
                empty = time.time()
                break
            await asyncio.sleep(POLL_EVERY_S)
        await uplink.offline()
    finally:
        await _cancel(task)
        await spool.close()
    return {"start": spool.first_peek, "acked": acked, "empty": empty, "batches": batches,
            "cpu_s": cpu_s,
            "published": uplink.stats.published, "reconnects": uplink.stats.reconnects}


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel until it ends: on 3.11 `asyncio.wait_for` can swallow one cancel (gh-86296)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)


# -- the baseline: raw paho ---------------------------------------------------------------------
def load_payloads(spool_path: Path) -> list[tuple[str, bytes]]:
    """Every spooled batch, oldest first, as (stream, payload)."""
    db = sqlite3.connect(spool_path)
    try:
        return [(s, bytes(p)) for s, p in
                db.execute("SELECT stream, payload FROM outbox ORDER BY id")]
    finally:
        db.close()


def drain_raw(spool_path: Path, broker_url: str, site: str, inflight: int) -> dict[str, Any]:
    """Publish every spooled payload with a bare paho client at QoS 1; wait for all PUBACKs."""
    payloads = load_payloads(spool_path)
    url = urlsplit(broker_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2,
                         client_id=f"emu-bench-raw-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(inflight)
    connected, done = threading.Event(), threading.Event()
    lock = threading.Lock()
    acks = [0]
    result: dict[str, Any] = {"batches": len(payloads)}

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            connected.set()

    def on_publish(_c: mqtt.Client, _u: Any, _mid: int, _r: Any, _p: Any) -> None:
        with lock:
            acks[0] += 1
            if acks[0] == len(payloads):
                result["acked"] = time.time()
                result["cpu_s"] = time.process_time() - result["cpu0"]
                done.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect_async(url.hostname or "127.0.0.1", url.port or 1883)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError(f"no CONNACK from {broker_url}")
        topics = {s: f"emu/v1/{site}/{s}" for s in ("telemetry", "events")}
        result["start"], result["cpu0"] = time.time(), time.process_time()
        for stream, payload in payloads:
            client.publish(topics[stream], payload, qos=1)
        if not done.wait(DRAIN_TIMEOUT_S):
            raise RuntimeError(f"only {acks[0]} of {len(payloads)} PUBACKs")
    finally:
        client.disconnect()
        client.loop_stop()
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, drain, write the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=["uplink", "raw"])
    parser.add_argument("--spool", type=Path, required=True)
    parser.add_argument("--broker", required=True, help="mqtt://host:port")
    parser.add_argument("--site", required=True)
    parser.add_argument("--inflight", type=int, default=50, help="raw: QoS 1 window")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.mode == "uplink":
        result = asyncio.run(drain_uplink(args.spool, args.broker, args.site))
    else:
        result = drain_raw(args.spool, args.broker, args.site, args.inflight)
    args.result.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
