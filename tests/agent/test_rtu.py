"""The agent's Modbus RTU path: `ModbusLink` + `ModbusCoordinator` against the simulator on a
virtual serial cable (socat pty pair): the simulator on end `a`, the agent on end `b`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agent.config import DeviceSettings
from agent.coordinator import ModbusCoordinator
from agent.devices.modbus import ModbusLink
from protocols.messages import EventKind, Quality, Severity
from protocols.profiles import load_profile
from protocols.registers import Table
from protocols.sunspec import SUNS_MARKER
from simulators.server import SimConfig, Simulator
from tests.support.serial_pair import SerialPair, serial_pair_fixture
from tests.support.sinks import RecordingSink

pytestmark = pytest.mark.integration

serial_pair = serial_pair_fixture()

BAUDRATE = 19200
COMM_LOSS_AFTER = 2


@pytest.fixture
async def sim(serial_pair: SerialPair) -> AsyncIterator[Simulator]:
    """EMU-BS at unit id 1 and EMU-PV at unit id 2 on the serial line's end `a`."""
    config = SimConfig(units=2, port=0, refresh_s=0.05, serial_port=serial_pair.a,
                       baudrate=BAUDRATE)
    async with Simulator(config) as s:
        yield s


def rtu_device(pair: SerialPair, name: str = "bs1", unit_id: int = 1) -> DeviceSettings:
    return DeviceSettings(
        name=name, protocol="modbus-rtu", serial_port=pair.b, unit_id=unit_id,
        profile="EMU-BS" if unit_id == 1 else "EMU-PV", baudrate=BAUDRATE, timeout_s=0.5,
        retries=0, comm_loss_after=COMM_LOSS_AFTER,
    )


@pytest.fixture
async def link(sim: Simulator, serial_pair: SerialPair) -> AsyncIterator[ModbusLink]:
    link = ModbusLink(rtu_device(serial_pair))
    yield link
    link.close()


async def test_link_reads_suns_over_rtu(link: ModbusLink) -> None:
    await link.connect()
    assert link.connected
    assert tuple(await link.read(Table.HOLDING, 40000, 2)) == SUNS_MARKER
    assert len(await link.read(Table.HOLDING, 40000, 125)) == 125
    assert link.where == f"{link.device.serial_port} unit 1"


async def test_coordinator_polls_a_unit_on_the_serial_line(
    sim: Simulator, link: ModbusLink
) -> None:
    sink = RecordingSink()
    coord = ModbusCoordinator(link.device, load_profile("EMU-BS"), link, sink)
    assert await coord.poll_once()
    device, _, _ = sink.cycles[-1]
    assert device == "bs1"
    soc, quality = sink.last()["battery.SoC"]
    assert quality is Quality.GOOD
    assert isinstance(soc, float)
    assert 0 <= soc <= 100
    assert sink.last()["common.SN"] == (sim.unit(1).serial, Quality.GOOD)
    assert coord.stats.failed_cycles == 0
    assert coord.stats.reads == coord.stats.reads_per_cycle > 1


async def test_comm_loss_on_the_serial_line_and_back(sim: Simulator, link: ModbusLink) -> None:
    sink = RecordingSink()
    coord = ModbusCoordinator(link.device, load_profile("EMU-BS"), link, sink)
    assert await coord.poll_once()

    sim.unit(1).inject("comm_loss")
    for cycle in range(1, COMM_LOSS_AFTER + 1):
        assert EventKind.COMM_LOST not in sink.kinds(), f"comm lost before cycle {cycle}"
        assert not await coord.poll_once()
    assert coord.comm_lost
    assert coord.stats.timeouts >= COMM_LOSS_AFTER
    assert sink.events[-1][:4] == (EventKind.COMM_LOST, "bs1", "comm_lost", Severity.ALARM)
    soc, quality = sink.last()["battery.SoC"]
    assert (soc, quality) == (None, Quality.COMM_LOST)

    sim.unit(1).clear("comm_loss")
    assert await coord.poll_once()
    assert not coord.comm_lost
    assert sink.events[-1][:4] == (EventKind.COMM_RESTORED, "bs1", "comm_lost", Severity.INFO)
    assert sink.last()["battery.SoC"][1] is Quality.GOOD
    assert sink.kinds().count(EventKind.COMM_LOST) == 1


async def test_two_units_on_one_serial_line(sim: Simulator, serial_pair: SerialPair) -> None:
    links = [ModbusLink(rtu_device(serial_pair, f"unit{n}", n)) for n in (1, 2)]
    try:
        for link in links:
            await link.connect()
            assert tuple(await link.read(Table.HOLDING, 40000, 2)) == SUNS_MARKER
    finally:
        for link in links:
            link.close()
