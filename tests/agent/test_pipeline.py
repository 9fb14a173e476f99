"""The agent end to end: simulated units over Modbus TCP -> agent -> broker -> a plain subscriber.

Acceptance: batches on `emu/v1/{site}/telemetry` validate against the schema, seq runs 1, 2, 3...,
points come from every unit, `agent_started` is the first event, the retained status is `online`
with health; compressed batches are enveloped; a silent unit raises `comm_lost` within three poll
intervals without delaying the others; Modbus exception replies are counted and logged.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.coordinator import ModbusCoordinator
from agent.service import HEALTH_FILE, Agent, read_health
from protocols.messages import AgentState, EventKind, Quality, Status, TelemetryBatch
from protocols.topics import TopicKind, topic
from simulators.server import SimConfig, Simulator
from tests.agent.agent_harness import (
    agent_config,
    broker_protocol,
    check_at_least_once,
    collecting,
    end_leftovers,
    load_config,
    received,
    record_cycles,
    running_agent,
    sim_device,
    unique_site,
)
from tests.support.broker import BrokerInfo
from tests.support.mqtt import mqtt_client
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

POLL_S = 0.5
TIMEOUT_S = 0.2
DEADLINE = 20.0
STOP_DEADLINE = 10.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """Three units (EMU-BS, EMU-PV, EMU-BS) with unit ids 1..3 on one free port."""
    async with Simulator(SimConfig(units=3, port=0, refresh_s=0.05)) as s:
        yield s


async def test_three_units_reach_a_plain_subscriber(
    sim: Simulator, mqtt_broker: BrokerInfo, tmp_path: Path
) -> None:
    site = unique_site("pipeline")
    devices = [sim_device(sim, n, poll_interval_s=POLL_S) for n in (1, 2, 3)]
    settings = load_config(tmp_path / "agent.toml", agent_config(
        site=site, broker_url=mqtt_broker.url, protocol=broker_protocol(mqtt_broker),
        state_dir=tmp_path, devices=devices))
    names = {"unit1", "unit2", "unit3"}
    with collecting(mqtt_broker, site) as seen:
        async with running_agent(settings) as agent:
            await wait_for(lambda: seen.devices_seen() == names and seen.max_telemetry_seq() >= 4,
                           DEADLINE, "telemetry from all three units in 4 batches")
            health_status = await wait_for(
                lambda: next((s for s, _ in seen.drain().statuses if s.health), None),
                DEADLINE, "a status carrying health")
            assert health_status is not None
            retained = _retained_status(mqtt_broker, site)
            await wait_for((tmp_path / HEALTH_FILE).is_file, DEADLINE, "the health file")
            health_file = read_health(tmp_path)
            stats = {c.name: c.stats for c in agent.coordinators}
        offline = await wait_for(
            lambda: next((s for s, _ in seen.drain().statuses if s.state is AgentState.OFFLINE),
                         None),
            DEADLINE, "offline after a clean stop")

    seqs = check_at_least_once(received(seen.telemetry))
    assert [b.seq for b, _ in seen.telemetry] == seqs, "no replays without an outage"
    batches = [b for b, _ in seen.telemetry]
    assert all(b.agent == site for b in batches)
    for name in names:
        stamps = [p.ts for b in batches for p in b.points if p.device == name]
        assert stamps == sorted(stamps), f"{name}: samples out of order"
        assert stats[name].cycles >= 2
        assert stats[name].timeouts == stats[name].exceptions == 0
    qualities = {p.quality for b in batches for p in b.points}
    assert Quality.COMM_LOST not in qualities
    assert Quality.GOOD in qualities

    check_at_least_once(received(seen.events))
    first_events = seen.events[0][0]
    assert first_events.seq == 1
    started = first_events.events[0]
    assert started.kind is EventKind.AGENT_STARTED
    assert started.detail["devices"] == ["unit1", "unit2", "unit3"]

    statuses = [s for s, _ in seen.statuses]
    assert statuses[0].state is AgentState.ONLINE
    assert health_status.state is AgentState.ONLINE
    assert health_status.health is not None
    assert set(health_status.health.errors) == names
    assert retained.state is AgentState.ONLINE
    assert retained.health is not None
    assert statuses[-1] == offline, "offline is the last word of a clean stop"
    assert health_file["site"] == site
    assert set(health_file["devices"]) == names


def _retained_status(broker: BrokerInfo, site: str) -> Status:
    """What a newcomer gets on the status topic: the retained message."""
    with mqtt_client(broker) as late:
        late.subscribe(topic(site, TopicKind.STATUS))
        msg = late.receive(what="the retained status")
    assert msg.retain, "status must be retained"
    return Status.from_bytes(bytes(msg.payload))


async def test_compressed_batches_are_enveloped(
    sim: Simulator, mqtt_broker: BrokerInfo, tmp_path: Path
) -> None:
    site = unique_site("compress")
    settings = load_config(tmp_path / "agent.toml", agent_config(
        site=site, broker_url=mqtt_broker.url, protocol=broker_protocol(mqtt_broker),
        state_dir=tmp_path, devices=[sim_device(sim, n, poll_interval_s=POLL_S) for n in (1, 2)],
        uplink={"compress": True}))
    with collecting(mqtt_broker, site) as seen:
        async with running_agent(settings):
            await wait_for(lambda: seen.max_telemetry_seq() >= 3, DEADLINE, "3 telemetry batches")

    for batch, payload in seen.telemetry:
        envelope = json.loads(payload)
        assert set(envelope) == {"encoding", "body"}
        assert envelope["encoding"] == "zlib+json"
        assert TelemetryBatch.from_bytes(payload) == batch
        assert batch.points
    assert json.loads(seen.events[0][1])["events"], "events travel as plain JSON"


async def test_silent_unit_is_comm_lost_and_does_not_delay_the_others(
    sim: Simulator, mqtt_broker: BrokerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = unique_site("commloss")
    devices = [sim_device(sim, n, poll_interval_s=POLL_S, timeout_s=TIMEOUT_S, retries=0)
               for n in (1, 2, 3)]
    settings = load_config(tmp_path / "agent.toml", agent_config(
        site=site, broker_url=mqtt_broker.url, protocol=broker_protocol(mqtt_broker),
        state_dir=tmp_path, devices=devices))
    silent_cycles = 8
    with collecting(mqtt_broker, site) as seen:
        async with running_agent(settings) as agent:
            cycles = record_cycles(monkeypatch, agent.batcher)
            await wait_for(lambda: seen.devices_seen() == {"unit1", "unit2", "unit3"},
                           DEADLINE, "telemetry from all three units")
            injected = datetime.now(UTC)
            sim.unit(2).inject("comm_loss")
            lost = await wait_for(lambda: seen.find_event(EventKind.COMM_LOST, "unit2"),
                                  DEADLINE, "comm_lost of unit2")
            assert lost is not None
            start = len(cycles)
            await wait_for(
                lambda: sum(c.device == "unit1" for c in cycles[start:]) >= silent_cycles,
                DEADLINE, f"{silent_cycles} more cycles of unit1 while unit2 is silent")
            cleared = datetime.now(UTC)
            sim.unit(2).clear()
            restored = await wait_for(lambda: seen.find_event(EventKind.COMM_RESTORED, "unit2"),
                                      DEADLINE, "comm_restored of unit2")
            assert restored is not None
            stats = {c.name: c for c in agent.coordinators}
            await wait_for(lambda: seen.has_cycles(list(cycles)), DEADLINE,
                           "every cycle so far at the subscriber")

    # comm_loss_after = 3 failed cycles: the third starts within 3 intervals, plus its timeout
    assert lost.ts - injected <= timedelta(seconds=3 * POLL_S + TIMEOUT_S + 0.3)
    assert int(str(lost.detail["failed_cycles"])) >= 3
    assert restored.ts >= cleared
    assert restored.ts - cleared <= timedelta(seconds=2 * POLL_S + 0.5)
    assert not stats["unit2"].comm_lost
    assert stats["unit2"].stats.timeouts >= 3
    assert any(c.device == "unit2" and c.qualities == {Quality.COMM_LOST.value} for c in cycles)

    for name in ("unit1", "unit3"):
        stamps = [t for t in seen.sample_times(name)
                  if injected - timedelta(seconds=POLL_S) <= t <= cleared]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
        assert len(stamps) >= silent_cycles
        assert max(gaps) <= 2.5 * POLL_S, f"{name} was held up by the silent unit: {gaps}"
        assert stats[name].stats.timeouts == 0


async def test_exception_replies_are_counted_and_logged(
    sim: Simulator, mqtt_broker: BrokerInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.coordinator")
    site = unique_site("exception")
    assert sim.unit(1).profile.series == "EMU-BS"
    devices = [
        sim_device(sim, 1, name="bs", poll_interval_s=POLL_S),
        # an EMU-PV map read from an EMU-BS unit: its input registers are not there (exception 2)
        sim_device(sim, 1, name="pv-at-bs", profile="EMU-PV", poll_interval_s=POLL_S),
    ]
    settings = load_config(tmp_path / "agent.toml", agent_config(
        site=site, broker_url=mqtt_broker.url, protocol=broker_protocol(mqtt_broker),
        state_dir=tmp_path, devices=devices))
    with collecting(mqtt_broker, site) as seen:
        async with running_agent(settings) as agent:
            wrong = next(c for c in agent.coordinators if c.name == "pv-at-bs")
            await wait_for(lambda: wrong.stats.exceptions >= 3, DEADLINE, "3 exception replies")
            published = await wait_for(
                lambda: next((s.health for s, _ in seen.drain().statuses
                              if s.health and s.health.errors.get("pv-at-bs")), None),
                DEADLINE, "health on the status topic counting pv-at-bs's errors")
            assert published is not None
            health = await agent.health()
            before = {c.name: c.stats.cycles for c in agent.coordinators}
            await wait_for(lambda: all(c.stats.cycles >= before[c.name] + 2
                                       for c in agent.coordinators),
                           DEADLINE, "both devices to keep polling")
            assert all(not t.done() for t in agent._tasks), "no agent task may have ended"

    dev = health["devices"]["pv-at-bs"]
    assert dev["exceptions"] >= 3
    assert not dev["comm_lost"], "a unit that answers with exceptions is still reachable"
    assert health["devices"]["bs"]["exceptions"] == 0
    assert published.errors["bs"] == 0
    logged = [r for r in caplog.records
              if r.name == "agent.coordinator" and "exception 2" in r.getMessage()]
    assert len(logged) >= 3, "exception replies must be logged"
    assert {p.device for b, _ in seen.telemetry for p in b.points} == {"bs", "pv-at-bs"}


async def test_a_poll_loop_that_dies_is_logged_and_stop_still_says_offline(
    sim: Simulator, mqtt_broker: BrokerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug that escapes a poll loop must be reported, and must not derail a clean stop."""
    original = ModbusCoordinator.poll_once

    async def poll_once(self: ModbusCoordinator) -> bool:
        if self.name == "doomed":
            raise RuntimeError("a bug in the poll cycle")
        return await original(self)

    monkeypatch.setattr(ModbusCoordinator, "poll_once", poll_once)
    site = unique_site("dying")
    devices = [sim_device(sim, 1, name="fine", poll_interval_s=POLL_S),
               sim_device(sim, 2, name="doomed", poll_interval_s=POLL_S)]
    settings = load_config(tmp_path / "agent.toml", agent_config(
        site=site, broker_url=mqtt_broker.url, protocol=broker_protocol(mqtt_broker),
        state_dir=tmp_path, devices=devices))
    with collecting(mqtt_broker, site) as seen:
        async with running_agent(settings) as agent:
            await wait_for(lambda: "fine" in seen.devices_seen(), DEADLINE, "telemetry of fine")
            await wait_for(
                lambda: [r for r in caplog.records
                         if r.levelno >= logging.ERROR and "poll:doomed" in r.getMessage()],
                DEADLINE, "an error log naming the poll loop that ended")
        await wait_for(
            lambda: any(s.state is AgentState.OFFLINE for s, _ in seen.drain().statuses),
            DEADLINE, "offline after the stop")
    assert agent.spool._db is None, "the spool is closed"


async def test_stop_ends_a_poll_loop_that_swallowed_its_cancellation(
    sim: Simulator, mqtt_broker: BrokerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.11 `asyncio.wait_for`, which pymodbus awaits every reply with, returns the
    reply instead of raising when the cancellation and the reply arrive together: the poll loop
    carries on. `stop()` (SIGTERM) must end it all the same instead of waiting forever."""
    in_read = asyncio.Event()
    swallowed: list[str] = []

    async def poll_once(self: ModbusCoordinator) -> bool:
        if swallowed:
            return True
        in_read.set()
        try:
            await asyncio.sleep(3600)  # a read in flight when stop() cancels the loop
        except asyncio.CancelledError:
            swallowed.append(self.name)  # ... and its reply lands at the same moment
        return True

    monkeypatch.setattr(ModbusCoordinator, "poll_once", poll_once)
    site = unique_site("cancel")
    settings = load_config(tmp_path / "agent.toml", agent_config(
        site=site, broker_url=mqtt_broker.url, protocol=broker_protocol(mqtt_broker),
        state_dir=tmp_path, devices=[sim_device(sim, 1, poll_interval_s=POLL_S)]))
    with collecting(mqtt_broker, site) as seen:
        agent = Agent(settings)
        await agent.start()
        stopping: asyncio.Task[None] | None = None
        try:
            await wait_for(in_read, DEADLINE, "a poll cycle in flight")
            await wait_for(lambda: seen.drain().statuses, DEADLINE, "the agent online")
            stopping = asyncio.create_task(agent.stop())
            done, _ = await asyncio.wait({stopping}, timeout=STOP_DEADLINE)
        finally:
            await end_leftovers(agent)  # if stop() hangs, end what keeps it waiting
            if stopping is not None:
                await stopping
            else:
                await agent.stop()
    assert swallowed == ["unit1"]
    assert stopping in done, f"stop() still waiting after {STOP_DEADLINE:g} s"
