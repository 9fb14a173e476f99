"""Comm loss by silence is judged against the site still being heard, not the wall clock alone.

The 1,000-site load benchmark (docs/benchmarks.md, fleet load, finding 1) saw the scheduler
open a class A comm-loss fault for every unit while ingest lagged: their data was late, not
missing. Two units of one site share one engine here, on a manual clock.
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import col

from protocols.clock import ManualClock
from protocols.messages import Event, TelemetryPoint
from protocols.profiles import load_profile
from server.core.db import Database
from server.models import Agent, Unit
from simulators.unit import SimUnit
from tests.server.test_fault_engine import POLL_S, AgentView, Rig, clock, make_rig

__all__ = ["clock"]  # the manual clock fixture

Polled = tuple[list[TelemetryPoint], list[Event]]


async def two_units(db: Database, clock: ManualClock, *, online: bool = True) -> tuple[Rig, Rig]:
    """Two units of one site with an agent whose last status was `online` (or `offline`)."""
    first = await make_rig(db, clock)
    async with db.session() as s:
        unit = Unit(site_id=first.unit.site_id, device="unit2", series=first.unit.series,
                    model=first.unit.model)
        s.add(unit)
        s.add(Agent(agent_id=f"agent-{first.site.code}", site_id=first.unit.site_id,
                    online=online))
    assert first.unit.series is not None
    sim = SimUnit(load_profile(first.unit.series), 2, clock=clock)
    second = Rig(db, clock, first.site, unit, sim, AgentView(sim, "unit2"), first.engine)
    second.listen(first.engine)
    return first, second


def poll(*rigs: Rig) -> list[tuple[Rig, Polled]]:
    return [(r, r.agent.poll(r.clock.now())) for r in rigs]


async def deliver(polled: list[tuple[Rig, Polled]]) -> None:
    for rig, (points, events) in polled:
        await rig.feed(points, events)


async def test_a_lagging_server_opens_no_comm_loss(db: Database, clock: ManualClock) -> None:
    first, second = await two_units(db, clock)
    for _ in range(6):
        clock.advance(POLL_S)
        await deliver(poll(first, second))
        await first.tick()
    backlog: list[tuple[Rig, Polled]] = []
    for _ in range(36):  # 180 s of data held up before ingest (a broker outage, an overload)
        clock.advance(POLL_S)
        backlog += poll(first, second)
        await first.tick()
    assert await first.open_faults() == {}
    assert await second.open_faults() == {}
    for i in range(0, len(backlog), 2):  # the backlog is stored, cycle by cycle, between ticks
        await deliver(backlog[i:i + 2])
        await first.tick()
    assert await first.open_faults() == {}
    assert await second.open_faults() == {}
    assert first.calls == second.calls == []


async def test_a_unit_silent_while_its_site_is_heard_is_comm_loss(
    db: Database, clock: ManualClock
) -> None:
    first, second = await two_units(db, clock)
    for _ in range(6):
        clock.advance(POLL_S)
        await deliver(poll(first, second))
        await first.tick()
    last = clock.now()
    for _ in range(18):  # the site keeps reporting, the second unit sends nothing at all
        clock.advance(POLL_S)
        await deliver(poll(first))
        await first.tick()
    assert await first.open_faults() == {}
    assert await second.open_faults() == {"comm_loss": "A"}
    (fault,) = await second.faults()
    assert fault.opened_at == last + timedelta(seconds=60)
    assert fault.evidence["trigger"][0]["lost_by"] == "silence"


async def test_an_offline_agent_past_silence_is_comm_loss(
    db: Database, clock: ManualClock
) -> None:
    first, second = await two_units(db, clock)
    for _ in range(6):
        clock.advance(POLL_S)
        await deliver(poll(first, second))
        await first.tick()
    async with db.session() as s:  # the broker published the agent's will
        await s.exec(sa.update(Agent).where(col(Agent.site_id) == first.unit.site_id)
                     .values(online=False))
    for _ in range(14):
        clock.advance(POLL_S)
        await first.tick()
    assert await first.open_faults() == {"comm_loss": "A"}
    assert await second.open_faults() == {"comm_loss": "A"}
