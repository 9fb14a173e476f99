"""A simulated customer site for commissioning tests: six EMU units on one Modbus TCP port.

Units 1..6 alternate EMU-BS and EMU-PV (serials `EMU-BS100-000001`, `EMU-PV50H-000002`, ...).
`site()` sets unit 2 to the wrong firmware and injects `insulation_low` into unit 3; plans in
the tests choose which of the six they expect, so the same site shows missing and extra units.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from protocols.commissioning import Target
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
