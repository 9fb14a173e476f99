"""`emu sim load`: a fleet's telemetry at a steady rate, for load tests of broker and server.

Each simulated site is one MQTT connection (as each gateway is) that publishes what its
agent would: one telemetry batch per poll interval with every unit's readings, at QoS 1,
`agent` = site code and `seq` counting up. The readings are a real simulated unit's values
(`SimUnit.values()`, profiles cycling EMU-BS, EMU-PV as `emu sim` does), taken once; each
batch carries them with the current timestamp, so the server does the work it would do for a
real fleet (validation, new series on first sight, fault rules, storage) at a fraction of the
cost of running the fleet's Modbus polling.

Like an agent, each site says it is there: a retained `online` status (the `Status` a real
agent publishes at connect) once connected, with the retained `offline` status as its MQTT
last will and published again before a clean disconnect. So the server judges the silence
of a load-test site's units as it does for a real site (against its agent being online).

Sites publish evenly spread over the interval (site k of n at k/n of it), all from one
thread that drives every paho client through one selector (paho's external-loop API), so a
thousand connections cost a thousand sockets, not a thousand threads. Publishing falls
behind schedule only when this process or the broker cannot keep up; `behind_max_s` says
how far. The run ends after `duration_s` and waits for the outstanding PUBACKs.
"""

from __future__ import annotations

import json
import os
import selectors
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent import __version__ as AGENT_VERSION
from protocols.messages import AgentState, Status
from protocols.profiles import load_profile
from protocols.registers import PointType
from protocols.topics import TopicKind, topic
from simulators.errors import SimulatorError
from simulators.unit import SimUnit

DEFAULT_PROFILES = ("EMU-BS", "EMU-PV")
CONNECT_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0
_TS = b"@@TS@@"
_NOT_TELEMETRY = (PointType.SUNSSF, PointType.PAD)


@dataclass(frozen=True)
class LoadConfig:
    """What to publish, where, and how fast."""

    url: str = "mqtt://127.0.0.1:1883"
    sites: int = 1000
    units: int = 10
    interval_s: float = 10.0
    duration_s: float = 60.0
    prefix: str = "load"
    profiles: tuple[str, ...] = DEFAULT_PROFILES
    first_seq: int = 1
    settle_s: float = 0.0
    """After every site connected and said `online`, wait this long before the first batch:
    a steady-state measurement leaves out the connect storm of a thousand agents at once."""
    username: str | None = None
    password: str | None = None


@dataclass
class LoadResult:
    """What a run did (printed as one JSON line by the CLI)."""

    sites: int
    units: int
    points_per_batch: int
    bytes_per_batch: int
    published: int = 0
    acked: int = 0
    start: float = 0.0
    end: float = 0.0
    behind_max_s: float = 0.0
    cpu_s: float = 0.0
    disconnects: int = 0
    statuses: int = 0
    """Status messages published (`online` at connect, `offline` before the end)."""
    publishes: list[tuple[str, int, float]] = field(default_factory=list)
    """(agent, seq, wall time of the publish call) of every batch."""

    def summary(self) -> dict[str, Any]:
        """The result without the per-batch list."""
        out = asdict(self)
        del out["publishes"]
        span = self.end - self.start
        out["batches_per_s"] = round(self.published / span, 2) if span > 0 else None
        out["points_per_s"] = (round(self.published * self.points_per_batch / span)
                               if span > 0 else None)
        return out


def site_code(prefix: str, n: int) -> str:
    """The code of simulated site `n` (0-based)."""
    return f"{prefix}-{n:05d}"


def unit_readings(profiles: Sequence[str], units: int) -> list[tuple[str, list[tuple[str, Any]]]]:
    """(device name, [(point, value)]) of each unit of a site: what its agent reports."""
    out = []
    for n in range(1, units + 1):
        profile = load_profile(profiles[(n - 1) % len(profiles)])
        values = SimUnit(profile, n).values()
        polled = [p.name for p in profile.poll_points if p.type not in _NOT_TELEMETRY]
        points = [(name, values[name]) for name in polled if values.get(name) is not None]
        out.append((f"{profile.series.lower()}-{n}", points))
    return out


def batch_template(readings: list[tuple[str, list[tuple[str, Any]]]]) -> tuple[bytes, int]:
    """The `points` array of one site's batch with a timestamp placeholder; its point count."""
    points = [
        {"device": device, "point": name, "ts": _TS.decode(), "value": value,
         "quality": "good"}
        for device, values in readings for name, value in values
    ]
    return json.dumps(points, separators=(",", ":")).encode(), len(points)


def status(code: str, state: AgentState) -> bytes:
    """The status payload a site's agent publishes (its agent id is the site code)."""
    return Status(state=state, agent=code, version=AGENT_VERSION,
                  ts=datetime.fromtimestamp(time.time(), UTC)).to_bytes()


def _iso(wall: float) -> bytes:
    text = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z").encode()


class _Site:
    """One site's connection and sequence."""

    def __init__(self, code: str, client: mqtt.Client, seq: int) -> None:
        self.code = code
        self.client = client
        self.seq = seq
        self.topic = topic(code, TopicKind.TELEMETRY)
        self.status_topic = topic(code, TopicKind.STATUS)
        self.status_mids: set[int] = set()
        """Status publishes not yet acknowledged (not counted as batches)."""
        self.connected = False
        self.sock: mqtt.SocketLike | None = None


class FleetLoad:
    """Publishes `config`'s fleet on schedule; `run()` blocks until done."""

    def __init__(self, config: LoadConfig, clock: Callable[[], float] = time.monotonic,
                 progress: Callable[[str], None] | None = None) -> None:
        if config.sites < 1 or config.units < 1 or config.interval_s <= 0:
            raise SimulatorError("sites, units and interval must be positive")
        if config.settle_s < 0:
            raise SimulatorError("settle must not be negative")
        url = urlparse(config.url)
        if url.scheme != "mqtt" or not url.hostname:
            raise SimulatorError(f"the load generator takes mqtt://host[:port], not {config.url}")
        self.config = config
        self.host, self.port = url.hostname, url.port or 1883
        self.clock = clock
        self.progress = progress
        """Told `connected` once every site is, then `publishing` when the first batch is due."""
        self.points, self.count = batch_template(unit_readings(config.profiles, config.units))
        self.result = LoadResult(config.sites, config.units, self.count, len(self.points))
        self.sel = selectors.DefaultSelector()
        self.sites: list[_Site] = []
        self.connected_at: float | None = None
        """Wall time every site had its CONNACK (the settle period starts)."""

    # -- connections ----------------------------------------------------------------------
    def connect(self) -> None:
        """Connect every site (each says `online`); SimulatorError if one is refused."""
        for n in range(self.config.sites):
            code = site_code(self.config.prefix, n)
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"emu-load-{code}",
                                 protocol=mqtt.MQTTv311)
            if self.config.username:
                client.username_pw_set(self.config.username, self.config.password)
            site = _Site(code, client, self.config.first_seq)
            client.on_connect = self._on_connect(site)
            client.on_publish = self._on_publish(site)
            client.on_disconnect = self._on_disconnect(site)
            client.max_inflight_messages_set(50)
            client.will_set(site.status_topic, status(code, AgentState.OFFLINE), qos=1,
                            retain=True)
            if client.connect(self.host, self.port, keepalive=60) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise SimulatorError(f"cannot connect site {code} to {self.config.url}")
            site.sock = client.socket()
            if site.sock is not None:
                self.sel.register(site.sock, selectors.EVENT_READ, site)
            self.sites.append(site)
        deadline = self.clock() + CONNECT_TIMEOUT_S
        while not all(s.connected for s in self.sites):
            if self.clock() > deadline:
                missing = sum(not s.connected for s in self.sites)
                raise SimulatorError(f"{missing} sites got no CONNACK from {self.config.url}")
            self._pump(0.05)

    def _on_connect(self, site: _Site) -> Callable[..., None]:
        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                raise SimulatorError(f"{self.config.url} refused site {site.code}: {reason}")
            site.connected = True
            self._publish_status(site, AgentState.ONLINE)
        return on_connect

    def _on_disconnect(self, site: _Site) -> Callable[..., None]:
        def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
            self.result.disconnects += 1
            site.connected = False
            if site.sock is not None:
                self.sel.unregister(site.sock)
                site.sock = None
        return on_disconnect

    def _on_publish(self, site: _Site) -> Callable[..., None]:
        def on_publish(_c: mqtt.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
            if mid in site.status_mids:
                site.status_mids.discard(mid)
            else:
                self.result.acked += 1
        return on_publish

    def _publish_status(self, site: _Site, state: AgentState) -> None:
        info = site.client.publish(site.status_topic, status(site.code, state), qos=1,
                                   retain=True)
        site.status_mids.add(info.mid)
        self.result.statuses += 1

    def _pump(self, timeout: float) -> None:
        """One round of socket I/O for every client that has something to do."""
        for site in self.sites:
            if site.sock is None:
                continue
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if site.client.want_write()
                                            else 0)
            if self.sel.get_key(site.sock).events != want:
                self.sel.modify(site.sock, want, site)
        for key, events in self.sel.select(timeout):
            site = key.data
            if events & selectors.EVENT_READ:
                site.client.loop_read()
            if events & selectors.EVENT_WRITE:
                site.client.loop_write()

    # -- publishing -----------------------------------------------------------------------
    def _publish(self, site: _Site) -> None:
        wall = time.time()
        stamp = _iso(wall)
        head = b'{"agent":"%s","seq":%d,"sent_at":"%s","points":' % (
            site.code.encode(), site.seq, stamp)
        payload = head + self.points.replace(_TS, stamp) + b"}"
        site.client.publish(site.topic, payload, qos=1)
        self.result.publishes.append((site.code, site.seq, wall))
        self.result.published += 1
        site.seq += 1

    def run(self) -> LoadResult:
        """Connect every site, publish for `duration_s`, wait for the PUBACKs, disconnect."""
        cpu0 = os.times()
        try:
            self.connect()
            self._settle()
            self._schedule()
            deadline = self.clock() + DRAIN_TIMEOUT_S
            while self.result.acked < self.result.published and self.clock() < deadline:
                self._pump(0.05)
            self.result.end = time.time()
            self._say_offline(deadline)
        finally:
            self.close()
        cpu1 = os.times()
        self.result.cpu_s = round(cpu1.user - cpu0.user + cpu1.system - cpu0.system, 3)
        return self.result

    def close(self) -> None:
        """Disconnect every site still connected (no `offline`: see `run`) and stop."""
        for site in self.sites:
            if site.sock is not None:
                site.client.disconnect()  # calls on_disconnect, which unregisters
        self.sel.close()

    def _say_offline(self, deadline: float) -> None:
        """`offline` (retained) from every connected site, as an agent that stops cleanly."""
        for site in self.sites:
            if site.connected:
                self._publish_status(site, AgentState.OFFLINE)
        while any(s.status_mids for s in self.sites if s.connected) and self.clock() < deadline:
            self._pump(0.05)

    def _settle(self) -> None:
        """Serve the sockets (PUBACKs of the statuses, keepalives) for `settle_s`."""
        self.connected_at = time.time()
        if self.progress is not None:
            self.progress("connected")
        end = self.clock() + self.config.settle_s
        while (now := self.clock()) < end:
            self._pump(min(0.05, end - now))
        if self.progress is not None:
            self.progress("publishing")

    def _schedule(self) -> None:
        cfg = self.config
        step = cfg.interval_s / cfg.sites
        total = int(cfg.duration_s / step)
        t0 = self.clock()
        self.result.start = time.time()
        last_misc = t0
        n = 0
        while n < total:
            now = self.clock()
            due = t0 + n * step
            if due <= now:
                self.result.behind_max_s = max(self.result.behind_max_s, now - due)
                self._publish(self.sites[n % cfg.sites])
                n += 1
                if n % 20:
                    continue  # behind schedule: catch up, but still serve the sockets
                wait = 0.0
            else:
                wait = min(due - now, 0.05)
            self._pump(wait)
            if now - last_misc >= 1.0:
                for site in self.sites:
                    site.client.loop_misc()
                last_misc = now


def write_publishes(path: Path, publishes: Sequence[tuple[str, int, float]]) -> None:
    """One line `agent,seq,wall time` per batch (for lag measurements)."""
    with path.open("w", encoding="utf-8") as out:
        for agent, seq, wall in publishes:
            out.write(f"{agent},{seq},{wall:.6f}\n")
