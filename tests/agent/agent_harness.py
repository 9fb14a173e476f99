"""Helpers for the agent's acceptance tests: configs, a running agent, and an outside observer.

The observer (`collecting`) is a plain paho client on the broker, not the project's uplink:
what it sees is what the server would see. It decodes every payload once with the schemas in
`protocols.messages`, so a batch that does not validate fails the test where it arrives.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import pytest

from agent.batcher import Batcher, iso
from agent.config import AgentSettings, load_agent_settings
from agent.service import Agent
from protocols.messages import (
    Event,
    EventBatch,
    EventKind,
    Quality,
    Status,
    TelemetryBatch,
    decode_batch,
)
from protocols.registers import Value
from protocols.topics import TopicKind, parse_topic, topic
from simulators.server import Simulator
from tests.support.broker import BrokerInfo
from tests.support.mqtt import TestClient, mqtt_client

PUBLISH_TIMEOUT = 10.0


def unique_site(label: str) -> str:
    """A site id no other test (or earlier run against the shared broker) uses."""
    return f"t-{label}-{uuid.uuid4().hex[:10]}"


def broker_protocol(broker: BrokerInfo) -> str:
    """amqtt speaks 3.1.1 only; against a real broker let the uplink negotiate (v5 first)."""
    return "3.1.1" if broker.embedded else "auto"


def sim_device(
    sim: Simulator, number: int, name: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A `[[devices]]` entry for simulated unit `number` with its own profile (override any key)."""
    host, port, unit_id = sim.where(number)
    return {
        "name": name or f"unit{number}",
        "protocol": "modbus-tcp",
        "profile": sim.unit(number).profile.series,
        "host": host,
        "port": port,
        "unit_id": unit_id,
        **extra,
    }


def agent_config(
    *,
    site: str,
    broker_url: str,
    protocol: str,
    state_dir: Path,
    devices: Sequence[Mapping[str, Any]],
    uplink: Mapping[str, Any] | None = None,
    broker: Mapping[str, Any] | None = None,
    spool: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An agent.toml as a dict, with short timers so that tests see results in seconds."""
    return {
        "site": site,
        "state_dir": str(state_dir),
        "broker": {
            "url": broker_url,
            "protocol": protocol,
            "connect_timeout_s": 3.0,
            "backoff_max_s": 1.0,
            **(broker or {}),
        },
        "uplink": {"batch_max_age_s": 0.5, "health_interval_s": 1.0, **(uplink or {})},
        "spool": {"path": "spool.db", **(spool or {})},
        "devices": [dict(d) for d in devices],
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """The small subset of TOML an agent.toml needs: scalars, tables, arrays of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict | list)]
    lines += [f"{k} = {_toml_value(v)}" for k, v in data.items()
              if isinstance(v, list) and not any(isinstance(i, dict) for i in v)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and any(isinstance(i, dict) for i in value):
            for item in value:
                lines += ["", f"[[{key}]]"]
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    """Write `data` as TOML to `path` and return the path."""
    path.write_text(to_toml(data), encoding="utf-8")
    return path


def load_config(path: Path, data: Mapping[str, Any]) -> AgentSettings:
    """Settings as `emu agent -c path` would load them (EMU_AGENT_* must not leak in)."""
    leaked = sorted(k for k in os.environ if k.startswith("EMU_AGENT_"))
    assert not leaked, f"environment overrides would change the test's agent: {leaked}"
    return load_agent_settings(write_config(path, data))


@asynccontextmanager
async def running_agent(settings: AgentSettings) -> AsyncIterator[Agent]:
    """An in-process agent, started, and stopped cleanly (flush, `offline`) on exit."""
    agent = Agent(settings)
    await agent.start()
    try:
        yield agent
    finally:
        try:
            await agent.stop()
        finally:
            await end_leftovers(agent)


async def end_leftovers(agent: Agent, attempts: int = 5) -> None:
    """End whatever a failed `stop()` left running, so that nothing outlives the test.

    An uplink cancelled here still disconnects cleanly, so the broker publishes no will after
    the test has cleared the retained status.
    """
    for _ in range(attempts):
        pending = [t for t in agent._tasks if not t.done()]
        if not pending:
            return
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=2.0)


def agent_env() -> dict[str, str]:
    """The environment for an agent subprocess: ours without any EMU_AGENT_* overrides."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EMU_AGENT_")}


def _log_file(path: Path) -> IO[bytes]:
    return path.open("ab")


async def start_agent_process(config: Path, log: Path) -> asyncio.subprocess.Process:
    """`python -m emu agent -c config` as a real process, its output appended to `log`."""
    with _log_file(log) as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "emu", "agent", "-c", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            env=agent_env(), cwd=config.parent,
        )


async def stop_agent_process(proc: asyncio.subprocess.Process, grace_s: float = 15.0) -> int:
    """SIGTERM (a clean stop) and wait; SIGKILL if it does not end in time. The exit code."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                return await proc.wait()
        except TimeoutError:
            proc.kill()
    return await proc.wait()


@dataclass(frozen=True)
class SpoolRow:
    """One batch read straight from a spool file."""

    stream: str
    seq: int
    payload: bytes


def read_spool(path: Path) -> tuple[list[SpoolRow], dict[str, int]]:
    """(batches in id order, last seq per stream) of a spool file, opened read-only."""
    if not path.exists():
        return [], {}
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = [SpoolRow(stream, seq, bytes(payload)) for stream, seq, payload in
                db.execute("SELECT stream, seq, payload FROM outbox ORDER BY id")]
        meta = {key.removeprefix("seq:"): int(value) for key, value in
                db.execute("SELECT key, value FROM meta WHERE key LIKE 'seq:%'")}
    except sqlite3.OperationalError:  # the agent has not created its tables yet
        return [], {}
    finally:
        db.close()
    return rows, meta


# --- what the agent did (ground truth, recorded in-process) -------------------------------


@dataclass(frozen=True)
class Cycle:
    """One device's samples of one poll cycle, as the coordinator handed them to the batcher."""

    device: str
    ts: str
    points: int
    qualities: frozenset[str]


def record_cycles(monkeypatch: pytest.MonkeyPatch, batcher: Batcher) -> list[Cycle]:
    """Record every `add_samples` call on `batcher` (it still does its work)."""
    cycles: list[Cycle] = []
    original = batcher.add_samples

    def add_samples(
        device: str, ts: datetime, samples: Iterable[tuple[str, Value | None, Quality]]
    ) -> None:
        items = list(samples)
        if items:
            qualities = frozenset(q.value for _, _, q in items)
            cycles.append(Cycle(device, iso(ts), len(items), qualities))
        original(device, ts, items)

    monkeypatch.setattr(batcher, "add_samples", add_samples)
    return cycles


# --- what a subscriber on the broker sees ------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One telemetry or events batch as it came off the broker."""

    seq: int
    payload: bytes


@dataclass
class Collector:
    """Everything published under `emu/v1/{site}/`, decoded and validated on arrival."""

    client: TestClient
    site: str
    telemetry: list[tuple[TelemetryBatch, bytes]] = field(default_factory=list)
    events: list[tuple[EventBatch, bytes]] = field(default_factory=list)
    statuses: list[tuple[Status, bool]] = field(default_factory=list)
    cleared_status: int = 0
    points_by_cycle: dict[tuple[str, str], int] = field(default_factory=dict)
    _seen_telemetry: set[int] = field(default_factory=set)

    def drain(self) -> Collector:
        """Decode what arrived since the last call (each payload must validate)."""
        while not self.client.messages.empty():
            msg = self.client.messages.get_nowait()
            site, kind = parse_topic(msg.topic)
            assert site == self.site, msg.topic
            payload = bytes(msg.payload)
            if kind is TopicKind.TELEMETRY:
                batch = decode_batch(payload)
                self.telemetry.append((batch, payload))
                if batch.seq not in self._seen_telemetry:
                    self._seen_telemetry.add(batch.seq)
                    for p in batch.points:
                        key = (p.device, iso(p.ts))
                        self.points_by_cycle[key] = self.points_by_cycle.get(key, 0) + 1
            elif kind is TopicKind.EVENTS:
                self.events.append((EventBatch.from_bytes(payload), payload))
            elif kind is TopicKind.STATUS:
                if payload:
                    self.statuses.append((Status.from_bytes(payload), bool(msg.retain)))
                else:
                    self.cleared_status += 1
        return self

    def telemetry_seqs(self) -> list[int]:
        """Telemetry seqs in arrival order (replays included)."""
        return [b.seq for b, _ in self.drain().telemetry]

    def max_telemetry_seq(self) -> int:
        """The highest telemetry seq seen so far (0 if none)."""
        return max(self.telemetry_seqs(), default=0)

    def devices_seen(self) -> set[str]:
        """Devices that have points in some telemetry batch."""
        return {p.device for b, _ in self.drain().telemetry for p in b.points}

    def all_events(self) -> list[Event]:
        """Every event, in arrival order of first delivery of its batch."""
        out: list[Event] = []
        seen: set[int] = set()
        for batch, _ in self.drain().events:
            if batch.seq not in seen:
                seen.add(batch.seq)
                out.extend(batch.events)
        return out

    def find_event(self, kind: EventKind, device: str | None = None) -> Event | None:
        """The first event of `kind` (for `device`), if one arrived."""
        for ev in self.all_events():
            if ev.kind is kind and (device is None or ev.device == device):
                return ev
        return None

    def sample_times(self, device: str) -> list[datetime]:
        """Distinct sample timestamps of `device`, in order."""
        return sorted({p.ts for b, _ in self.drain().telemetry for p in b.points
                       if p.device == device})

    def first_delivery_times(self, device: str) -> list[str]:
        """`device`'s sample timestamps in the order they first arrived (replays skipped)."""
        out: list[str] = []
        seqs: set[int] = set()
        stamps: set[str] = set()
        for batch, _ in self.drain().telemetry:
            if batch.seq in seqs:
                continue
            seqs.add(batch.seq)
            for p in batch.points:
                ts = iso(p.ts)
                if p.device == device and ts not in stamps:
                    stamps.add(ts)
                    out.append(ts)
        return out

    def has_cycles(self, cycles: Iterable[Cycle]) -> bool:
        """Whether every cycle's points have arrived."""
        self.drain()
        return all(self.points_by_cycle.get((c.device, c.ts), 0) >= c.points for c in cycles)


@contextmanager
def collecting(broker: BrokerInfo, site: str) -> Iterator[Collector]:
    """Subscribe to `emu/v1/{site}/#` directly on the broker; clear the retained status after."""
    with mqtt_client(broker) as client:
        client.subscribe(f"emu/v1/{site}/#", qos=1)
        try:
            yield Collector(client, site)
        finally:
            clear_retained(client, site)


def clear_retained(client: TestClient, site: str) -> None:
    """Delete the agent's retained status (the broker is shared and keeps it otherwise)."""
    info = client.client.publish(topic(site, TopicKind.STATUS), b"", qos=1, retain=True)
    info.wait_for_publish(PUBLISH_TIMEOUT)


# --- checks ------------------------------------------------------------------------------


def check_at_least_once(batches: Sequence[Received]) -> list[int]:
    """Assert an at-least-once, in-order delivery; return the distinct seqs in order.

    A seq may arrive again (a replay after a reconnect) only with the identical payload; the
    first deliveries run 1, 2, 3... without a gap or a step back.
    """
    first: dict[int, bytes] = {}
    order: list[int] = []
    for b in batches:
        if b.seq in first:
            assert first[b.seq] == b.payload, f"seq {b.seq} arrived twice with different content"
            continue
        first[b.seq] = b.payload
        order.append(b.seq)
    assert order == list(range(1, len(order) + 1)), f"seqs not 1, 2, 3... in order: {order}"
    return order


def received(pairs: Iterable[tuple[TelemetryBatch | EventBatch, bytes]]) -> list[Received]:
    """(seq, payload) of decoded batches."""
    return [Received(b.seq, payload) for b, payload in pairs]
