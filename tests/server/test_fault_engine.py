"""The fault engine on the real database, fed what the agent would send for a simulated unit.

`AgentView` turns a `SimUnit` (with its injected faults) into the samples and events the
site agent's coordinator sends (agent/coordinator.py): every poll cycle's points with their
quality, `stale` for the points of a request that got a Modbus exception, nothing for a cycle
whose request timed out, and comm_lost/comm_restored after `comm_loss_after` failed cycles.
Time is a ManualClock, so the shipped rules (hold times, windows) run unchanged in no time.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from agent.config import DeviceSettings
from agent.coordinator import ModbusCoordinator, Sample
from agent.devices.modbus import ModbusLink
from protocols.clock import ManualClock
from protocols.messages import Event, EventKind, Quality, Severity, TelemetryPoint
from protocols.planner import plan_reads
from protocols.profiles import load_profile
from protocols.registers import PointType, Value
from server.core.db import Database
from server.faults import FaultEngine
from server.models import Fault, Organisation, Site, Unit
from simulators.server import SimConfig, Simulator
from simulators.unit import SimUnit
from tests.support.waiting import wait_for

POLL_S = 5.0
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
_NOT_TELEMETRY = (PointType.SUNSSF, PointType.PAD)


class AgentView:
    """The samples and events the agent's coordinator would send for one simulated unit."""

    def __init__(self, sim: SimUnit, device: str, *, comm_loss_after: int = 3,
                 retries: int = 1, seed: int = 7) -> None:
        profile = sim.profile
        self.sim, self.device = sim, device
        self.points = [p for p in profile.poll_points if p.type not in _NOT_TELEMETRY]
        self.plan = plan_reads(profile.poll_points, max_gap=profile.max_gap)
        self.comm_loss_after, self.retries = comm_loss_after, retries
        self.rng = random.Random(seed)
        self.failures = 0
        self.lost = False
        self.last: dict[str, Value | None] = {}

    def _request(self) -> str:
        for _ in range(self.retries + 1):
            if not self.sim.answering():
                continue  # no answer: the client times out, then retries
            if not self.sim.misses():
                return "ok"
            if self.rng.random() < 0.5:
                return "exception"  # Modbus exception 6 (busy)
        return "timeout"

    def poll(self, ts: datetime) -> tuple[list[TelemetryPoint], list[Event]]:
        """One poll cycle at `ts`."""
        failed: set[str] = set()
        for req in self.plan:
            outcome = self._request()
            if outcome == "timeout":
                return self._failed(ts)
            if outcome == "exception":
                failed.update(req.points)
        events = []
        if self.lost:
            self.lost = False
            events.append(Event(ts=ts, kind=EventKind.COMM_RESTORED, device=self.device,
                                code="comm_lost", detail={"failed_cycles": self.failures}))
        self.failures = 0
        values = self.sim.values()
        points = []
        for p in self.points:
            value = values.get(p.name)
            if p.name in failed:
                if self.last.get(p.name) is not None:
                    points.append(self._point(ts, p.name, self.last[p.name], Quality.STALE))
                continue
            if value is None:
                continue
            out = (p.minimum is not None and isinstance(value, int | float)
                   and not (p.minimum <= value <= (p.maximum or value)))
            points.append(self._point(ts, p.name, value,
                                      Quality.OUT_OF_RANGE if out else Quality.GOOD))
            self.last[p.name] = value
        return points, events

    def _failed(self, ts: datetime) -> tuple[list[TelemetryPoint], list[Event]]:
        self.failures += 1
        if self.lost or self.failures < self.comm_loss_after:
            return [], []
        self.lost = True
        event = Event(ts=ts, kind=EventKind.COMM_LOST, device=self.device, code="comm_lost",
                      severity=Severity.ALARM, detail={"failed_cycles": self.failures})
        return [self._point(ts, p.name, None, Quality.COMM_LOST) for p in self.points], [event]

    def _point(self, ts: datetime, name: str, value: Value | None, q: Quality) -> TelemetryPoint:
        return TelemetryPoint(device=self.device, point=name, ts=ts, value=value, quality=q)


@dataclass
class Rig:
    """One simulated unit, its site and unit rows, and a fault engine, on a manual clock."""

    db: Database
    clock: ManualClock
    site: Site
    unit: Unit
    sim: SimUnit
    agent: AgentView
    engine: FaultEngine
    fed: list[tuple[list[TelemetryPoint], list[Event]]] = field(default_factory=list)
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    skew: timedelta = timedelta(0)  # the gateway's clock against the server's

    def listen(self, engine: FaultEngine) -> FaultEngine:
        for name, hooks in (("opened", engine.on_fault_opened),
                            ("escalated", engine.on_fault_escalated),
                            ("cleared", engine.on_fault_cleared)):
            hooks.append(self._recorder(name))
        return engine

    def _recorder(self, name: str) -> Any:
        async def record(session: AsyncSession, fault: Fault) -> None:
            assert session.in_transaction()
            if fault.unit_id == self.unit.id:  # the engine also sees other tests' silent units
                self.calls.append((name, fault.code, fault.fault_class))
        return record

    async def feed(self, points: Sequence[TelemetryPoint], events: Sequence[Event],
                   engine: FaultEngine | None = None) -> None:
        """What ingest does with one cycle: store (here: unit.last_seen), then the hooks."""
        engine = engine or self.engine
        async with self.db.session() as s:
            if points:
                await s.exec(sa.update(Unit).where(col(Unit.id) == self.unit.id)
                             .where(sa.or_(col(Unit.last_seen).is_(None),
                                           col(Unit.last_seen) < points[0].ts))
                             .values(last_seen=points[0].ts))
                await engine.on_telemetry(s, self.site, self.unit, points)
            for e in events:
                await engine.on_event(s, self.site, self.unit, e)

    async def tick(self, engine: FaultEngine | None = None) -> None:
        async with self.db.session() as s:
            await (engine or self.engine).tick(s, self.clock.now())

    async def run(self, seconds: float) -> None:
        """Poll (and tick, as the scheduler does) every 5 s for `seconds`."""
        for _ in range(round(seconds / POLL_S)):
            self.clock.advance(POLL_S)
            points, events = self.agent.poll(self.clock.now() + self.skew)
            self.fed.append((points, events))
            await self.feed(points, events)
            await self.tick()

    async def replay(self, engine: FaultEngine | None = None) -> None:
        for points, events in self.fed:
            await self.feed(points, events, engine)

    async def faults(self) -> list[Fault]:
        async with self.db.session() as s:
            rows = await s.exec(select(Fault).where(Fault.unit_id == self.unit.id)
                                .order_by(col(Fault.id)))
            return list(rows.all())

    async def open_faults(self) -> dict[str, str]:
        return {f.code: f.fault_class for f in await self.faults() if f.state == "open"}

    async def snapshot(self) -> list[tuple[Any, ...]]:
        return [(f.id, f.code, f.fault_class, f.state, f.opened_at, f.last_seen_at,
                 f.clearing_since, f.cleared_at, f.escalated_from) for f in await self.faults()]

    async def fresh_unit(self) -> Unit:
        async with self.db.session() as s:
            unit = await s.get(Unit, self.unit.id)
            assert unit is not None
            return unit


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


async def make_rig(db: Database, clock: ManualClock, series: str = "EMU-BS",
                   policy: dict[str, Any] | None = None) -> Rig:
    tag = uuid.uuid4().hex[:10]
    async with db.session() as s:
        org = Organisation(name=f"faults-{tag}")
        s.add(org)
        await s.flush()
        assert org.id is not None
        site = Site(code=f"f-{tag}", name=f"Fault site {tag}", org_id=org.id,
                    timezone="Asia/Shanghai", policy=policy or {})
        s.add(site)
        await s.flush()
        assert site.id is not None
        unit = Unit(site_id=site.id, device="unit1", series=series,
                    model=load_profile(series).model)
        s.add(unit)
    sim = SimUnit(load_profile(series), 1, clock=clock)
    rig = Rig(db, clock, site, unit, sim, AgentView(sim, "unit1"), FaultEngine(clock))
    rig.listen(rig.engine)
    return rig


@pytest.fixture
async def rig(db: Database, clock: ManualClock) -> Rig:
    return await make_rig(db, clock)


# --- each simulated fault gets its class ---------------------------------------------------

VALUE_FAULTS = [("trip", "A"), ("grid_loss", "A"), ("over_temperature", "B"),
                ("insulation_low", "B"), ("soc_low", "B"), ("derating", "C")]


@pytest.mark.parametrize("series", ["EMU-BS", "EMU-PV"])
@pytest.mark.parametrize(("name", "cls"), VALUE_FAULTS)
async def test_simulated_fault_gets_its_class_and_clears(
    db: Database, clock: ManualClock, series: str, name: str, cls: str
) -> None:
    rig = await make_rig(db, clock, series)
    await rig.run(60)
    assert await rig.open_faults() == {}
    rig.sim.inject(name)
    injected = clock.now()
    await rig.run(30)
    assert await rig.open_faults() == {name: cls}
    (fault,) = await rig.faults()
    assert fault.opened_at == injected + timedelta(seconds=POLL_S)  # the first cycle after
    assert fault.title
    assert fault.evidence["rule"]["code"] == name
    assert fault.evidence["trigger"][0]["samples"]
    assert fault.site_id == rig.site.id

    rig.sim.clear(name)
    cleared = clock.now()
    await rig.run(60)
    assert await rig.open_faults() == {}
    (fault,) = await rig.faults()
    assert fault.state == "cleared"
    assert fault.clearing_since == cleared + timedelta(seconds=POLL_S)
    assert fault.cleared_at == fault.clearing_since + timedelta(seconds=30)
    assert fault.evidence["cleared"]["hold_s"] == 30.0
    assert rig.calls == [("opened", name, cls), ("cleared", name, cls)]


async def test_replay_changes_nothing(db: Database, clock: ManualClock, rig: Rig) -> None:
    await rig.run(30)
    rig.sim.inject("over_temperature")
    await rig.run(60)
    rig.sim.clear("over_temperature")
    await rig.run(60)
    rig.sim.inject("trip")
    await rig.run(60)  # this one stays open
    before = await rig.snapshot()
    assert [(code, state) for _, code, _, state, *_ in before] == [
        ("over_temperature", "cleared"), ("trip", "open")]
    calls = list(rig.calls)

    await rig.replay()  # the same batches again, same process
    assert await rig.snapshot() == before

    restarted = rig.listen(FaultEngine(clock))  # a restarted server replays everything
    rig.unit = await rig.fresh_unit()
    await rig.replay(restarted)
    assert await rig.snapshot() == before
    assert rig.calls == calls


async def test_intermittent_comms_is_class_d(db: Database, clock: ManualClock, rig: Rig) -> None:
    await rig.run(60)
    rig.sim.inject("intermittent_comms")  # rate 0.3, as `emu sim inject` does
    await rig.run(300)
    stale = sum(any(p.quality is Quality.STALE for p in pts) for pts, _ in rig.fed[-60:])
    missed = sum(not pts for pts, _ in rig.fed[-60:])
    assert stale >= 10  # what the D rule sees
    assert missed >= 1
    assert await rig.open_faults() == {"intermittent_comms": "D"}
    rig.sim.clear("intermittent_comms")
    await rig.run(180)  # the window (120 s) empties, then the hold (30 s)
    assert await rig.open_faults() == {}


@pytest.mark.parametrize("series", ["EMU-BS", "EMU-PV"])
async def test_healthy_units_raise_nothing(db: Database, clock: ManualClock, series: str) -> None:
    rig = await make_rig(db, clock, series)
    await rig.run(1800)
    assert await rig.faults() == []


async def test_comm_loss_reported_by_the_agent_is_class_a(
    db: Database, clock: ManualClock, rig: Rig
) -> None:
    await rig.run(30)
    rig.sim.inject("comm_loss")
    await rig.run(60)
    lost = next(e for _, evs in rig.fed for e in evs if e.kind is EventKind.COMM_LOST)
    assert await rig.open_faults() == {"comm_loss": "A"}
    (fault,) = await rig.faults()
    assert fault.opened_at == lost.ts + timedelta(seconds=10)  # for_s after the report
    assert fault.evidence["trigger"][0]["lost_by"] == "event"
    rig.sim.clear("comm_loss")
    await rig.run(60)
    assert await rig.open_faults() == {}
    assert [c[0] for c in rig.calls] == ["opened", "cleared"]


async def test_silence_is_comm_loss_also_after_a_restart(
    db: Database, clock: ManualClock, rig: Rig
) -> None:
    await rig.run(30)
    last = clock.now()
    for _ in range(20):  # the whole gateway is gone: no data, no events
        clock.advance(POLL_S)
        await rig.tick()
    assert await rig.open_faults() == {"comm_loss": "A"}
    (fault,) = await rig.faults()
    assert fault.opened_at == last + timedelta(seconds=60)
    assert fault.evidence["trigger"][0]["lost_by"] == "silence"

    other = await make_rig(db, clock)  # a second unit goes silent while the server is down
    await other.run(30)
    other_last = clock.now()
    clock.advance(300)
    restarted = FaultEngine(clock)
    await other.tick(restarted)
    assert await other.open_faults() == {}  # the gateway's clock is not trusted for absence
    clock.advance(60)
    await other.tick(restarted)
    assert await other.open_faults() == {"comm_loss": "A"}
    (fault,) = await other.faults()
    assert fault.opened_at == other_last + timedelta(seconds=60)  # recorded in sample time


@pytest.mark.parametrize("skew_s", [-600, 600])
async def test_a_gateway_clock_off_by_minutes_is_no_comm_loss(
    db: Database, clock: ManualClock, rig: Rig, skew_s: int
) -> None:
    rig.skew = timedelta(seconds=skew_s)
    await rig.run(300)
    assert await rig.faults() == []
    rig.sim.inject("comm_loss")
    await rig.run(60)
    assert await rig.open_faults() == {"comm_loss": "A"}
    lost = next(e for _, evs in rig.fed for e in evs if e.kind is EventKind.COMM_LOST)
    (fault,) = await rig.faults()
    assert fault.opened_at == lost.ts + timedelta(seconds=10)
    rig.sim.clear("comm_loss")
    await rig.run(60)
    assert await rig.open_faults() == {}


async def test_over_temperature_escalates_to_a_when_the_unit_trips(
    db: Database, clock: ManualClock, rig: Rig
) -> None:
    await rig.run(30)
    rig.sim.inject("over_temperature")
    await rig.run(30)
    assert await rig.open_faults() == {"over_temperature": "B"}
    rig.sim.inject("trip")
    await rig.run(10)
    assert await rig.open_faults() == {"over_temperature": "A", "trip": "A"}
    ot = next(f for f in await rig.faults() if f.code == "over_temperature")
    assert ot.escalated_from == "B"
    assert ot.title == "Over-temperature: unit at its limit or tripped"
    (esc,) = ot.evidence["escalations"]
    assert (esc["from"], esc["to"]) == ("B", "A")
    assert esc["trigger"][0]["bit"] == "TRIP"
    assert rig.calls == [("opened", "over_temperature", "B"), ("opened", "trip", "A"),
                         ("escalated", "over_temperature", "A")]
    rig.sim.clear("trip")
    await rig.run(60)
    assert await rig.open_faults() == {"over_temperature": "A"}  # escalation is not undone


async def test_over_temperature_past_the_limit_opens_escalated(
    db: Database, clock: ManualClock, rig: Rig
) -> None:
    await rig.run(30)
    rig.sim.inject("over_temperature", {"offset_c": 70})
    await rig.run(10)
    (fault,) = await rig.faults()
    assert (fault.code, fault.fault_class, fault.escalated_from) == ("over_temperature", "A", "B")
    assert rig.calls == [("opened", "over_temperature", "A")]


async def test_site_policy_changes_and_disables_rules(db: Database, clock: ManualClock) -> None:
    policy = {"fault_rules": {"defaults": {"clear_hold_s": 5},
                              "rules": {"derating": {"class": "B", "value": 20.0,
                                                     "also": []}}}}
    rig = await make_rig(db, clock, policy=policy)
    await rig.run(30)
    rig.sim.inject("derating", {"limit_pct": 50})
    await rig.run(30)
    assert await rig.open_faults() == {}  # 50 % is above this site's limit
    rig.sim.inject("derating", {"limit_pct": 10})
    await rig.run(30)
    assert await rig.open_faults() == {"derating": "B"}
    rig.sim.clear("derating")
    await rig.run(10)
    assert await rig.open_faults() == {}  # after this site's 5 s hold

    rig.sim.inject("derating", {"limit_pct": 10})
    await rig.run(15)
    assert await rig.open_faults() == {"derating": "B"}
    rig.site.policy = {"fault_rules": {"rules": {"derating": {"enabled": False}}}}
    await rig.run(10)
    assert await rig.open_faults() == {}
    orphan = (await rig.faults())[-1]
    assert orphan.evidence["cleared"]["reason"] == "rule disabled or removed"


async def test_engine_policy_applies_to_every_site_under_the_sites_own(
    db: Database, clock: ManualClock
) -> None:
    engine_policy = {"defaults": {"clear_hold_s": 0}, "rules": {"trip": {"enabled": False}}}
    plain = await make_rig(db, clock)
    own = await make_rig(db, clock, policy={"fault_rules": {"rules": {"trip": {"enabled": True}}}})
    for rig in (plain, own):
        rig.engine = rig.listen(FaultEngine(clock, policy=engine_policy))
        rig.sim.inject("trip")
        await rig.run(10)
    assert await plain.open_faults() == {}
    assert await own.open_faults() == {"trip": "A"}
    assert own.engine.book(own.site, own.unit).rule("trip").clear_hold_s == 0
    own.sim.clear("trip")
    await own.run(5)
    assert await own.open_faults() == {}


async def test_a_bad_site_policy_falls_back_to_the_shipped_rules(
    db: Database, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make_rig(db, clock, policy={"fault_rules": {"rules": {"trip": {"bit": "X"}}}})
    await rig.run(10)
    rig.sim.inject("trip")
    await rig.run(10)
    assert await rig.open_faults() == {"trip": "A"}
    assert "policy.fault_rules: rules.trip.bit: emu.Alarm has no bit 'X'" in caplog.text


async def test_another_process_opened_it_first(db: Database, clock: ManualClock, rig: Rig) -> None:
    await rig.run(10)  # the engine knows the unit: no open trip
    rig.sim.inject("trip")
    assert rig.site.id is not None
    assert rig.unit.id is not None
    async with db.session() as s:  # meanwhile another server process opened it
        s.add(Fault(site_id=rig.site.id, unit_id=rig.unit.id, code="trip", fault_class="A",
                    title="Tripped (other process)", opened_at=clock.now(),
                    last_seen_at=clock.now()))
    await rig.run(30)
    faults = await rig.faults()
    assert [(f.code, f.state, f.title) for f in faults] == [
        ("trip", "open", "Tripped (other process)")]
    assert rig.calls == []  # it was not opened here
    rig.sim.clear("trip")
    await rig.run(40)
    assert await rig.open_faults() == {}  # but this process follows and clears it
    assert rig.calls == [("cleared", "trip", "A")]


async def test_a_fault_cleared_elsewhere_reopens_if_still_there(
    db: Database, clock: ManualClock, rig: Rig
) -> None:
    rig.sim.inject("trip")
    await rig.run(20)
    async with db.session() as s:  # e.g. the release that fixes it was installed
        await s.exec(sa.update(Fault).where(col(Fault.unit_id) == rig.unit.id)
                     .values(state="cleared", cleared_at=clock.now()))
    rig.engine.touch_s = 0.0
    await rig.run(10)
    assert [(f.code, f.state) for f in await rig.faults()] == [("trip", "cleared"),
                                                               ("trip", "open")]


async def test_a_restarted_engine_carries_on_with_the_open_fault(
    db: Database, clock: ManualClock, rig: Rig
) -> None:
    rig.sim.inject("insulation_low")
    await rig.run(30)
    rig.engine = rig.listen(FaultEngine(clock))
    rig.unit = await rig.fresh_unit()
    await rig.run(30)
    assert len(await rig.faults()) == 1
    rig.sim.clear("insulation_low")
    await rig.run(40)
    assert [(f.code, f.state) for f in await rig.faults()] == [("insulation_low", "cleared")]


async def test_a_rolled_back_batch_is_evaluated_again(
    db: Database, clock: ManualClock, rig: Rig
) -> None:
    await rig.run(10)
    rig.sim.inject("trip")
    clock.advance(POLL_S)
    points, _ = rig.agent.poll(clock.now())

    class Boom(Exception):
        pass

    async def then_fail() -> None:
        async with db.session() as s:
            await rig.engine.on_telemetry(s, rig.site, rig.unit, points)
            raise Boom  # e.g. the telemetry insert failed after the hook

    async def then_fail_in_savepoint(s: AsyncSession) -> None:
        async with s.begin_nested():
            await rig.engine.on_telemetry(s, rig.site, rig.unit, points)
            raise Boom

    with pytest.raises(Boom):
        await then_fail()
    assert await rig.faults() == []
    async with db.session() as s:  # ingest's per-hook savepoint rolls back, then it retries
        with pytest.raises(Boom):
            await then_fail_in_savepoint(s)
        await rig.engine.on_telemetry(s, rig.site, rig.unit, points)
    assert await rig.open_faults() == {"trip": "A"}
    assert [c[0] for c in rig.calls] == ["opened", "opened", "opened"]


async def test_tick_clears_a_unit_that_stopped_reporting(
    db: Database, clock: ManualClock, rig: Rig
) -> None:
    rig.sim.inject("trip")
    await rig.run(20)
    rig.sim.clear("trip")
    await rig.run(5)
    (fault,) = await rig.faults()
    assert fault.clearing_since is not None
    for _ in range(20):  # no more data: the scheduler clears it once the unit is not live
        clock.advance(POLL_S)
        await rig.tick()
    faults = {f.code: f for f in await rig.faults()}
    assert faults["trip"].state == "cleared"
    assert faults["trip"].cleared_at == fault.clearing_since + timedelta(seconds=30)
    assert faults["comm_loss"].state == "open"  # and the silence is a comm loss


async def test_site_events_are_ignored(db: Database, rig: Rig) -> None:
    async with db.session() as s:
        await rig.engine.on_event(s, rig.site, None, Event(ts=START, kind=EventKind.AGENT_STARTED))
    assert await rig.faults() == []


# --- the real agent over real Modbus -------------------------------------------------------


class Collector:
    """A coordinator sink that keeps what the agent would have sent."""

    def __init__(self) -> None:
        self.points: list[TelemetryPoint] = []
        self.events: list[Event] = []
        self.cycles = 0

    def add_samples(self, device: str, ts: datetime, samples: Any) -> None:
        batch: list[Sample] = list(samples)
        self.cycles += 1
        self.points.extend(TelemetryPoint(device=device, point=n, ts=ts, value=v, quality=q)
                           for n, v, q in batch)

    def add_event(self, ts: datetime, kind: EventKind, device: str | None,
                  code: str | None = None, severity: Severity = Severity.INFO,
                  detail: dict[str, Any] | None = None) -> None:
        self.events.append(Event(ts=ts, kind=kind, device=device, code=code, severity=severity,
                                 detail=detail or {}))


@pytest.mark.integration
async def test_real_agent_intermittent_comms_is_d_and_healthy_is_nothing(
    db: Database, clock: ManualClock
) -> None:
    poll_s, cycles = 0.3, 40
    policy = {"fault_rules": {"rules": {"intermittent_comms": {"window_s": 5.0}}}}
    async with Simulator(SimConfig(units=2, port=0, refresh_s=0.05,
                                   profiles=["EMU-BS"])) as sim:
        sim.unit(2).inject("intermittent_comms")
        sinks, tasks, coords = [], [], []
        for n in (1, 2):
            host, port, unit_id = sim.where(n)
            dev = DeviceSettings(name=f"unit{n}", protocol="modbus-tcp", profile="EMU-BS",
                                 host=host, port=port, unit_id=unit_id, poll_interval_s=poll_s,
                                 timeout_s=0.12)
            sink = Collector()
            coord = ModbusCoordinator(dev, load_profile("EMU-BS"), ModbusLink(dev), sink,
                                      backoff_cap_s=0.1)
            sinks.append(sink)
            coords.append(coord)
            tasks.append(asyncio.create_task(coord.run()))
        try:
            await wait_for(lambda: min(c.stats.cycles for c in coords) >= cycles, 60,
                           f"{cycles} poll cycles of both units")
        finally:
            for c in coords:
                c.stopping = True  # a cancel can be swallowed by wait_for on Python 3.11
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in coords:
                c.link.close()

    results = []
    for sink in sinks:
        rig = await make_rig(db, clock, policy=policy)
        for e in sink.events:
            e_unit = e.model_copy(update={"device": "unit1"})
            rig.fed.append(([], [e_unit]))
        by_ts: dict[datetime, list[TelemetryPoint]] = {}
        for p in sink.points:
            by_ts.setdefault(p.ts, []).append(p.model_copy(update={"device": "unit1"}))
        for ts in sorted(by_ts):
            rig.fed.append((by_ts[ts], []))
        rig.fed.sort(key=lambda f: (f[0] or f[1])[0].ts)
        await rig.replay()
        results.append(await rig.open_faults())
    stale = sum(p.quality is Quality.STALE for p in sinks[1].points)
    assert stale > 0, "the faulty unit should have stale samples"
    assert results == [{}, {"intermittent_comms": "D"}]
