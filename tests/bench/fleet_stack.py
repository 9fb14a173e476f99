"""Parts of the fleet load benchmark: seeded sites, a private broker, the stored-batch watcher.

- `seed_sites`: one organisation and `n` sites coded like `emu sim load`'s, in one statement.
- `private_broker`: a Mosquitto of its own on a free port (anonymous, plain; the deployed
  queue limit), so its CPU is the benchmark's alone.
- `StoredWatcher`: a thread polling `ingestedbatch` every `POLL_S` for newly committed
  telemetry batches; it notes when each (agent, seq) first became visible and its
  `received_at` (set inside the storing transaction, just before the rows are written).
- `Lags`: publish -> stored per batch, from the publisher's record and the watcher's notes.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from protocols.profiles import load_profile
from simulators.load import DEFAULT_PROFILES, site_code, unit_readings
from tests.support import mosquitto

POLL_S = 0.2
LOOKBACK_S = 10.0
"""A batch claimed this long before the newest one seen may still commit after it."""
POLICY = {"fault_rules": {"rules": {"comm_loss": {"enabled": False}}}}
"""The sites' policy: no silence-based comm_loss. Units seen once in the warm-up and then
waited on would all go `comm_loss` (1,270 class A faults twelve minutes into the first run,
and rising): a storm of the warm-up's making, not of steady state (docs/benchmarks.md)."""
BROKER_CONF = """\
# The fleet benchmark's own broker: anonymous, plain, loopback; queue limit as deployed.
listener 1883
allow_anonymous true
max_queued_messages 10000
"""


def libpq(url: str) -> str:
    """A SQLAlchemy URL as psycopg takes it."""
    parts = urlsplit(url)
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, ""))


def seed_sites(url: str, prefix: str, n: int) -> None:
    """An organisation and sites PREFIX-00000 .. (the codes `emu sim load` publishes as)."""
    import psycopg

    with psycopg.connect(libpq(url), autocommit=True) as conn:
        org = conn.execute("INSERT INTO organisation (name, kind) VALUES (%s, 'customer')"
                           " RETURNING id", (f"org-{prefix}",)).fetchone()
        assert org is not None
        conn.execute(
            "INSERT INTO site (code, name, org_id, timezone, policy, created_at)"
            " SELECT %(p)s || '-' || lpad(g::text, 5, '0'), 'Load site ' || g, %(org)s,"
            " 'Europe/Berlin', %(policy)s, now() FROM generate_series(0, %(last)s) AS g",
            {"p": prefix, "org": org[0], "last": n - 1, "policy": json.dumps(POLICY)})
    assert site_code(prefix, n - 1).endswith(f"{n - 1:05d}")


def seed_units(url: str, prefix: str, units: int) -> int:
    """Every site's units and series as `emu sim load` reports them, in two statements.

    Ingest creates them on first sight; doing it here spares the benchmark a warm-up of many
    minutes (the first-sight cost is measured on its own). Returns the series per site.
    """
    import psycopg

    readings = unit_readings(DEFAULT_PROFILES, units)
    profiles = {p.series.lower(): p for p in map(load_profile, DEFAULT_PROFILES)}
    devices = [d for d, _ in readings]
    series = [profiles[d.rsplit("-", 1)[0]].series for d in devices]
    meta = [dict(points) for _, points in readings]  # as reported: no unit update at first
    models = [str(m["common.Md"]) for m in meta]
    serials = [str(m["common.SN"]) for m in meta]
    firmware = [str(m.get("emu.FwVer") or m["common.Vr"]) for m in meta]
    pairs = [(d, point) for d, points in readings for point, _ in points]
    like = f"{prefix}-%"
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO unit (site_id, device, series, model, serial, firmware, comm_lost,"
            " first_seen) SELECT s.id, d.device, d.series, d.model, d.serial, d.fw, false, now()"
            " FROM site s CROSS JOIN unnest(%s::text[], %s::text[], %s::text[], %s::text[],"
            " %s::text[]) AS d(device, series, model, serial, fw) WHERE s.code LIKE %s",
            (devices, series, models, serials, firmware, like))
        conn.execute(
            "INSERT INTO series (unit_id, point) SELECT u.id, p.point FROM unit u"
            " JOIN site s ON s.id = u.site_id"
            " JOIN unnest(%s::text[], %s::text[]) AS p(device, point) ON p.device = u.device"
            " WHERE s.code LIKE %s", ([d for d, _ in pairs], [p for _, p in pairs], like))
    return len(pairs)


@contextmanager
def private_broker(tmp: Path) -> Iterator[mosquitto.Mosquitto]:
    """A Mosquitto for the benchmark alone; `.port('1883')` is where it listens."""
    conf = tmp / "bench-broker.conf"
    conf.write_text(BROKER_CONF, encoding="utf-8")
    with mosquitto.running(conf, tmp, {}) as broker:
        yield broker


def db_size(url: str) -> tuple[int, int]:
    """(database bytes, telemetry table bytes with its index)."""
    import psycopg

    with psycopg.connect(libpq(url), autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(current_database()),"
                           " pg_total_relation_size('telemetry')").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def backend_pids(url: str) -> list[int]:
    """PostgreSQL backends connected to the benchmark's database (the servers' pools)."""
    import psycopg

    with psycopg.connect(libpq(url), autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                            " AND pid <> pg_backend_pid()").fetchall()
    return [int(r[0]) for r in rows]


class StoredWatcher:
    """Notes when each telemetry batch became visible in `ingestedbatch` (after its commit)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: dict[tuple[str, int], tuple[float, float]] = {}
        """(agent, seq) -> (wall time first seen, received_at as epoch seconds)."""
        self.polls = 0
        self.poll_s_max = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="stored-watcher", daemon=True)

    def __enter__(self) -> StoredWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def count(self) -> int:
        """Batches seen so far."""
        with self._lock:
            return len(self.seen)

    def _run(self) -> None:
        import psycopg

        cursor = 0.0
        with psycopg.connect(libpq(self.url), autocommit=True) as conn:
            while not self._stop.is_set():
                started = time.time()
                rows = conn.execute(
                    "SELECT agent, seq, extract(epoch FROM received_at)::float8"
                    " FROM ingestedbatch WHERE stream = 'telemetry'"
                    " AND received_at > to_timestamp(%s)", (cursor - LOOKBACK_S,)).fetchall()
                now = time.time()
                with self._lock:
                    for agent, seq, received in rows:
                        self.seen.setdefault((agent, int(seq)), (now, float(received)))
                        cursor = max(cursor, float(received))
                self.polls += 1
                self.poll_s_max = max(self.poll_s_max, now - started)
                self._stop.wait(POLL_S)

    def snapshot(self) -> dict[tuple[str, int], tuple[float, float]]:
        """A copy of what was seen."""
        with self._lock:
            return dict(self.seen)


def read_publishes(path: Path) -> list[tuple[str, int, float]]:
    """The publisher's record: (agent, seq, wall time of the publish call)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        agent, seq, wall = line.split(",")
        out.append((agent, int(seq), float(wall)))
    return out


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass(frozen=True)
class Lags:
    """Publish -> stored, per batch of one step."""

    published: int
    stored: int
    visible: list[float]
    """Publish call -> first poll that saw the committed batch (upper bound, +POLL_S)."""
    claimed: list[float]
    """Publish call -> received_at (inside the storing transaction; lower bound)."""
    published_at: list[float] = field(default_factory=list)
    """Wall time of each stored batch's publish call (same order as `claimed`)."""

    @classmethod
    def of(cls, publishes: Sequence[tuple[str, int, float]],
           seen: dict[tuple[str, int], tuple[float, float]]) -> Lags:
        """Match the publisher's record with the watcher's notes."""
        visible, claimed, at = [], [], []
        for agent, seq, wall in publishes:
            hit = seen.get((agent, seq))
            if hit is not None:
                visible.append(hit[0] - wall)
                claimed.append(hit[1] - wall)
                at.append(wall)
        return cls(len(publishes), len(visible), visible, claimed, at)

    def stalls(self, over_s: float = 1.0, gap_s: float = 1.0) -> list[tuple[float, float, float]]:
        """(start, end, worst claimed lag) of the spells whose batches waited over `over_s`.

        Seconds from the step's first publish; tells a steady backlog (one long spell) from
        pauses (short spells, e.g. a collector walk or a checkpoint) in the tail.
        """
        if not self.published_at:
            return []
        t0 = min(self.published_at)
        slow = sorted((w - t0, c) for w, c in zip(self.published_at, self.claimed, strict=True)
                      if c > over_s)
        spells: list[tuple[float, float, float]] = []
        for t, c in slow:
            if spells and t - spells[-1][1] <= gap_s:
                start, _, worst = spells[-1]
                spells[-1] = (start, t, max(worst, c))
            else:
                spells.append((t, t, c))
        return spells

    @property
    def lost(self) -> int:
        """Batches published but never seen stored."""
        return self.published - self.stored
