"""A simulated customer site for commissioning tests: six EMU units on one Modbus TCP port.

Units 1..6 alternate EMU-BS and EMU-PV (serials `EMU-BS100-000001`, `EMU-PV50H-000002`, ...).
`site()` sets unit 2 to the wrong firmware and injects `insulation_low` into unit 3; plans in
the tests choose which of the six they expect, so the same site shows missing and extra units.
`seed_plan` puts a plan with its documents and results into the API tests' seeded world.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.commissioning import Target
from server.commissioning.models import (
    CommissioningDocument,
    CommissioningPlan,
    CommissioningRun,
    OnsiteResult,
)
from simulators.server import SimConfig, Simulator

WRONG_FIRMWARE_UNIT = 2
INSULATION_LOW_UNIT = 3
WRONG_FIRMWARE = "0.9.0"


def serial_of(sim: Simulator, number: int) -> str:
    """The serial number unit `number` reports."""
    return sim.unit(number).serial


@asynccontextmanager
async def site(units: int = 6) -> AsyncIterator[Simulator]:
    """The simulated site, served on a free loopback port; values frozen for the test."""
    config = SimConfig(units=units, port=0, profiles=("EMU-BS", "EMU-PV"), refresh_s=3600)
    async with Simulator(config) as sim:
        wrong = sim.unit(WRONG_FIRMWARE_UNIT)
        wrong.firmware.version = WRONG_FIRMWARE
        wrong.refresh(force=True)
        sim.unit(INSULATION_LOW_UNIT).inject("insulation_low")
        yield sim


def targets(sim: Simulator, unit_ids: str = "1-8") -> tuple[Target, ...]:
    """The site's one Modbus address with a unit-id range wider than what is there."""
    endpoint = sim.endpoints[0]
    return (Target(host=endpoint.host, port=endpoint.port, unit_ids=unit_ids),)


async def seed_plan(session: AsyncSession, site_id: int, marker: str, now: datetime) -> int:
    """A scheduled plan of one site with a stored plan and report, a run and an on-site
    result, each carrying `marker` (for the API's scoping walk); rows only, nothing
    rendered, so seeding stays cheap."""
    plan = CommissioningPlan(
        site_id=site_id, title=f"plan {marker}", mode="onsite", state="scheduled", version=1,
        technicians=[f"tech {marker}"], equipment=[{"series": "EMU-BS", "count": 1,
                                                    "serials": [f"SN-{marker}"]}],
        checklist={"EMU-BS": [{"name": "earthing", "where": "onsite",
                               "requirement": f"earth {marker}"}]},
        created_at=now, updated_at=now, issued_at=now, acknowledged_at=now)
    session.add(plan)
    await session.flush()
    plan_id = plan.id or 0
    session.add_all([
        CommissioningDocument(plan_id=plan_id, kind=kind, version=1, title=f"{kind} {marker}",
                              html=f"<html><body>{kind} {marker}</body></html>",
                              pdf=b"%PDF-1.3 stub", data={"marker": marker}, created_at=now)
        for kind in ("plan", "report")
    ])
    session.add(CommissioningRun(plan_id=plan_id, state="failed", requested_by=f"eng {marker}",
                                 requested_at=now, error=f"no agent {marker}"))
    session.add(OnsiteResult(plan_id=plan_id, serial=f"SN-{marker}", series="EMU-BS",
                             check="earthing", passed=True, detail=f"ok {marker}",
                             technician=f"tech {marker}", recorded_at=now))
    await session.flush()
    return plan_id
