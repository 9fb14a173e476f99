"""Parts of the fault-latency benchmark: scratch database, seeded site, config files, watchers.

- `scratch_database`: a migrated `emu_bench_<random>` PostgreSQL database on 127.0.0.1:5432
  (user postgres, trust; `EMU_BENCH_PG_URL` names another server), dropped afterwards; a
  SQLite file when nothing listens there.
- `seed_site`: an organisation and a site with a fault-rule policy, before anything publishes
  (telemetry for an unknown site is dropped).
- `server_toml` / `agent_toml`: the files `python -m emu server|agent -c FILE` run from.
- `AlarmWatcher`: a paho subscriber on the site's telemetry that notes, per armed device, when
  the first batch carrying that device's `emu.Alarm` with the TRIP bit reached the broker's
  subscribers, the sample's timestamp, and how many points that batch held. It scans the
  payload bytes with a regular expression (the batcher writes compact JSON in a fixed key
  order) instead of parsing ~100 KB of JSON per batch.
- `server_counters`: the server's ingest lag and unknown-site batches, from `/metrics`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from server.core.db import Database, migrate_sync
from server.models import Organisation, Site
from tests.support.broker import BrokerInfo
from tests.support.net import LOOPBACK, accepts_connections
from tests.support.waiting import wait_until

PG_URL_ENV = "EMU_BENCH_PG_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CONNECT_TIMEOUT_S = 10.0
TRIP_BIT = 3
"""`TRIP` in the vendor block's `Alarm` bitfield (protocols/profiles/models/model_64901.json)."""
POINT_MARK = b'{"device":'
_TS_RE = re.compile(rb'"ts":"([^"]+)"')
_ALARM_RE = re.compile(
    rb'"device":"([^"]+)","point":"emu\.Alarm","ts":"([^"]+)","value":(\d+)'
)


# -- database ---------------------------------------------------------------------------------
@contextmanager
def scratch_database(directory: Path) -> Iterator[tuple[str, str]]:
    """(SQLAlchemy URL, description) of a migrated, empty database; dropped afterwards."""
    base = os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL
    parts = urlsplit(base)
    if not accepts_connections(parts.hostname or LOOPBACK, parts.port or 5432):
        url = f"sqlite+aiosqlite:///{directory / f'bench-{secrets.token_hex(4)}.db'}"
        migrate_sync(url)
        yield url, "SQLite (no PostgreSQL on 127.0.0.1:5432)"
        return
    import psycopg

    name = f"emu_bench_{secrets.token_hex(5)}"
    admin = urlunsplit(("postgresql", parts.netloc, "/postgres", "", ""))
    with psycopg.connect(admin, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))
    try:
        migrate_sync(url)
        yield url, f"PostgreSQL {version[0] if version else '?'} ({name}, scratch)"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def seed_site(url: str, code: str, policy: dict[str, Any]) -> int:
    """Create an organisation and site `code` with `policy`; return the site's id."""
    db = Database(url)
    try:
        async with db.session() as s:
            org = Organisation(name=f"Bench {code}")
            s.add(org)
            await s.flush()
            assert org.id is not None
            site = Site(code=code, name=code, org_id=org.id, timezone="UTC", policy=policy)
            s.add(site)
            await s.flush()
            assert site.id is not None
            return site.id
    finally:
        await db.close()


# -- config files -----------------------------------------------------------------------------
def server_toml(db_url: str, broker: BrokerInfo, http_port: int, admin_token: str,
                group: str) -> str:
    """server.toml: all three roles, the bench broker (shared group of its own), the database."""
    protocol = "3.1.1" if broker.embedded else "auto"
    shared = group if broker.shared_subscriptions else ""
    return "\n".join([
        f"database_url = {json.dumps(db_url)}",
        'roles = ["api", "ingest", "scheduler"]',
        f"secret_key = {json.dumps(secrets.token_urlsafe(24))}",
        f"admin_token = {json.dumps(admin_token)}",
        "scheduler_tick_s = 1.0",
        "[mqtt]",
        f'url = "mqtt://{broker.host}:{broker.port}"',
        f"protocol = {json.dumps(protocol)}",
        f"shared_group = {json.dumps(shared)}",
        "[http]",
        f'host = "{LOOPBACK}"',
        f"port = {http_port}",
    ]) + "\n"


def agent_toml(site: str, state_dir: Path, broker: BrokerInfo, sim_port: int, units: int,
               profile: str, poll_interval_s: float, batch_max_age_s: float,
               health_interval_s: float) -> str:
    """agent.toml: `units` modbus-tcp devices bs-1..bs-N (unit ids 1..N on one simulator port)."""
    protocol = "3.1.1" if broker.embedded else "auto"
    lines = [
        f"site = {json.dumps(site)}",
        f"state_dir = {json.dumps(str(state_dir))}",
        "[broker]",
        f'url = "mqtt://{broker.host}:{broker.port}"',
        f"protocol = {json.dumps(protocol)}",
        "[uplink]",
        f"batch_max_age_s = {batch_max_age_s}",
        f"health_interval_s = {health_interval_s}",
        "[spool]",
        'path = "spool.db"',
    ]
    for n in range(1, units + 1):
        lines += [
            "[[devices]]", f'name = "bs-{n}"', 'protocol = "modbus-tcp"',
            f'host = "{LOOPBACK}"', f"port = {sim_port}", f"unit_id = {n}",
            f'profile = "{profile}"', f"poll_interval_s = {poll_interval_s}",
        ]
    return "\n".join(lines) + "\n"


# -- the telemetry watcher --------------------------------------------------------------------
@dataclass(frozen=True)
class Sighting:
    """The first batch on the broker that showed an armed device's TRIP bit."""

    arrived: float
    """time.time() when this subscriber received it (the server's copy leaves at the same time)."""
    sample_ts: float
    """The sample's own timestamp (the agent's cycle start), epoch seconds."""
    batch_points: int
    """Points in that batch: `batch_max_points` if it closed full, fewer if it closed by age."""
    batch_newest: float
    """Timestamp of the batch's newest sample: a cycle later than `sample_ts` if the sample was
    left over at the end of its cycle and waited for the next cycle's samples to fill the batch."""


@dataclass(frozen=True)
class Batch:
    """One telemetry batch as it reached the broker's subscribers."""

    arrived: float
    oldest: float
    """Timestamp of its first sample (the batcher appends in arrival order), epoch seconds."""
    newest: float
    """Timestamp of its last sample."""
    points: int


class AlarmWatcher:
    """Subscribes to `emu/v1/{site}/telemetry`; records `Sighting`s of armed devices."""

    def __init__(self, broker: BrokerInfo, site: str) -> None:
        self.broker = broker
        self.topic = f"emu/v1/{site}/telemetry"
        self.messages = 0
        self.points = 0
        self.batches: list[Batch] = []
        self._armed: set[str] = set()
        self.sightings: dict[str, Sighting] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"emu-bench-watch-{uuid.uuid4().hex[:8]}"
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_a: self._subscribed.set()
        self._client.on_message = self._on_message

    def __enter__(self) -> AlarmWatcher:
        self._client.connect_async(self.broker.host, self.broker.port)
        self._client.loop_start()
        wait_until(self._connected, CONNECT_TIMEOUT_S, f"CONNACK from {self.broker.url}")
        self._client.subscribe(self.topic, 1)
        wait_until(self._subscribed, CONNECT_TIMEOUT_S, f"SUBACK for {self.topic}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def arm(self, device: str) -> None:
        """From now on, note the first batch showing `device`'s TRIP bit."""
        with self._lock:
            self._armed.add(device)

    def sighting(self, device: str) -> Sighting | None:
        """What was noted for `device`, if anything yet."""
        with self._lock:
            return self.sightings.get(device)

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        payload = msg.payload
        size = payload.count(POINT_MARK)
        first = _TS_RE.search(payload)
        last_at = payload.rfind(b'"ts":"')
        last = _TS_RE.match(payload, last_at) if last_at >= 0 else None
        newest = _epoch(last.group(1)) if last else float("nan")
        with self._lock:
            self.messages += 1
            self.points += size
            if first and last:
                self.batches.append(Batch(now, _epoch(first.group(1)), newest, size))
            if not self._armed:
                return
            for m in _ALARM_RE.finditer(payload):
                device = m.group(1).decode()
                if (device in self._armed and device not in self.sightings
                        and int(m.group(3)) >> TRIP_BIT & 1):
                    self.sightings[device] = Sighting(now, _epoch(m.group(2)), size, newest)


def _epoch(iso_ts: bytes) -> float:
    return datetime.fromisoformat(iso_ts.decode().replace("Z", "+00:00")).timestamp()


# -- server metrics ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerCounters:
    """Cumulative counters from the server's `/metrics`."""

    lag_sum: float = 0.0
    """`emu_ingest_lag_seconds` (newest sample of a batch -> stored): sum and count."""
    lag_count: float = 0.0
    foreign: float = 0.0
    """Batches the ingest worker decoded and then dropped for an unknown site: other users of a
    shared broker (the worker subscribes to `emu/v1/+/...`, every site on it)."""

    def __sub__(self, other: ServerCounters) -> ServerCounters:
        return ServerCounters(self.lag_sum - other.lag_sum, self.lag_count - other.lag_count,
                              self.foreign - other.foreign)


def server_counters(metrics_text: str) -> ServerCounters:
    """The counters in a Prometheus text page of `emu server`."""
    lag_sum = lag_count = foreign = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("emu_ingest_lag_seconds_sum"):
            lag_sum = float(line.split()[-1])
        elif line.startswith("emu_ingest_lag_seconds_count"):
            lag_count = float(line.split()[-1])
        elif line.startswith("emu_ingest_batches_total{") and 'outcome="unknown_site"' in line:
            foreign += float(line.split()[-1])
    return ServerCounters(lag_sum, lag_count, foreign)
