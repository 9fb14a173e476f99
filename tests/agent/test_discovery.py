"""SunSpec auto-discovery against real Modbus TCP: the simulator, and bare pymodbus servers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.config import DeviceSettings
from agent.coordinator import ModbusCoordinator
from agent.devices.discovery import DiscoveringCoordinator, profile_from_chain
from agent.devices.modbus import ModbusLink
from agent.errors import DiscoveryError
from protocols.messages import EventKind, Quality
from protocols.profiles import load_profile
from protocols.registers import PointDef, Table
from protocols.sunspec import ModelHeader
from simulators.server import SimConfig, Simulator
from simulators.unit import SimUnit
from tests.support.sinks import RecordingSink
from tests.support.waiting import wait_for

HOST = "127.0.0.1"
BS_CHAIN = (1, 103, 124, 802, 64901)
PV_CHAIN = (1, 103, 160, 124, 64901)


def device(host: str, port: int, unit_id: int = 1, **extra: Any) -> DeviceSettings:
    return DeviceSettings(name=f"u{unit_id}", protocol="modbus-tcp", profile="sunspec",
                          host=host, port=port, unit_id=unit_id, timeout_s=0.3, retries=0,
                          **extra)


@asynccontextmanager
async def coordinator(
    dev: DeviceSettings, sink: RecordingSink, cls: type[ModbusCoordinator] | None = None
) -> AsyncIterator[Any]:
    """A coordinator whose link is closed afterwards; DiscoveringCoordinator unless `cls`."""
    link = ModbusLink(dev)
    coord: ModbusCoordinator = (
        DiscoveringCoordinator(dev, link, sink) if cls is None
        else cls(dev, load_profile(dev.profile), link, sink)
    )
    try:
        yield coord
    finally:
        link.close()


@asynccontextmanager
async def bare_server(dev: SimDevice) -> AsyncIterator[int]:
    """A pymodbus server for one device on a free loopback port; yields the port."""
    server = ModbusTcpServer([dev], address=(HOST, 0))
    await server.serve_forever(background=True)
    try:
        sockets = getattr(server.transport, "sockets", None)
        assert sockets, "the server is not listening"
        yield sockets[0].getsockname()[1]
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """EMU-BS as unit 1 and EMU-PV as unit 2; registers frozen so two reads see one state."""
    async with Simulator(SimConfig(units=2, port=0, refresh_s=3600)) as s:
        yield s


def _layout(p: PointDef) -> tuple[object, ...]:
    return p.name, p.address, p.type, p.size, p.table, p.sf, p.scale, p.symbols


@pytest.mark.integration
@pytest.mark.parametrize(("number", "chain"), [(1, BS_CHAIN), (2, PV_CHAIN)])
async def test_discovery_matches_the_shipped_profile(
    sim: Simulator, number: int, chain: tuple[int, ...]
) -> None:
    host, port, unit_id = sim.where(number)
    shipped = sim.unit(number).profile
    found, expected = RecordingSink(), RecordingSink()
    async with coordinator(device(host, port, unit_id), found) as disc:
        assert await disc.poll_once()
        assert disc.chain == chain
        profile = disc.profile
        assert [m.id for m in profile.models] == list(chain)
        assert [m.repeats for m in profile.models] == [m.repeats for m in shipped.models]
        assert (profile.manufacturer, profile.model) == (shipped.manufacturer, shipped.model)
        sunspec_points = [_layout(p) for p in shipped.points if p.table is Table.HOLDING]
        assert [_layout(p) for p in profile.points] == sunspec_points
    shipped_dev = device(host, port, unit_id).model_copy(update={"profile": shipped.series})
    async with coordinator(shipped_dev, expected, ModbusCoordinator) as plain:
        assert await plain.poll_once()
    got, want = found.values(), expected.values()
    assert got["common.SN"] == sim.unit(number).serial
    for name in ("common.Md", "inverter_three_phase.W", "inverter_three_phase.Hz",
                 "storage_basic.ChaState", "emu.Status", "emu.IntTmp"):
        assert got[name] == want[name], name
    assert got == {k: v for k, v in want.items() if k in got}
    assert set(want) - set(got) == {p.name for p in shipped.points if p.table is Table.INPUT}
    assert not found.events


@pytest.mark.integration
async def test_discovered_unit_is_polled_on_schedule(sim: Simulator) -> None:
    host, port, unit_id = sim.where(2)
    sink = RecordingSink()
    async with coordinator(device(host, port, unit_id, poll_interval_s=0.05), sink) as coord:
        task = asyncio.create_task(coord.run())
        try:
            await wait_for(lambda: len(sink.cycles) >= 3, 10, "three cycles of samples")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert coord.discoveries == 1
    assert coord.stats.failed_cycles == 0
    assert "mppt.module2.DCV" in sink.values()


@pytest.mark.integration
async def test_unit_without_sunspec_fails_cycles_and_loses_comm(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # holding registers only at 40000, all zero: no marker there, exceptions at 0 and 50000
    bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    regs = [SimData(40000, values=[0] * 16, datatype=DataType.REGISTERS)]
    dev = SimDevice(1, simdata=(bits, list(bits), regs, list(regs)))
    sink = RecordingSink()
    caplog.set_level(logging.WARNING, logger="agent")
    async with bare_server(dev) as port, coordinator(device(HOST, port, comm_loss_after=2),
                                                     sink) as coord:
        for _ in range(3):
            assert not await coord.poll_once()
    assert coord.stats.failed_cycles == 3
    assert coord.stats.cycles == 3
    assert "no SunS marker" in (coord.stats.last_error or "")
    assert sink.kinds() == [EventKind.COMM_LOST]
    assert coord.comm_lost
    assert not any(samples for _, _, samples in sink.cycles)  # no layout: nothing to mark
    logged = [r for r in caplog.records if "SunSpec discovery failed" in r.getMessage()]
    assert len(logged) == 1  # once per problem, not once per cycle


@pytest.mark.integration
async def test_silent_unit_loses_comm_then_is_discovered(sim: Simulator) -> None:
    host, port, unit_id = sim.where(1)
    sink = RecordingSink()
    sim.unit(1).inject("comm_loss")
    async with coordinator(device(host, port, unit_id, comm_loss_after=2), sink) as coord:
        assert not await coord.poll_once()
        assert not await coord.poll_once()
        assert coord.comm_lost
        assert coord.stats.timeouts >= 2
        sim.unit(1).clear("comm_loss")
        assert await coord.poll_once()
    assert coord.chain == BS_CHAIN
    assert sink.kinds() == [EventKind.COMM_LOST, EventKind.COMM_RESTORED]
    assert 0 <= float(sink.values()["battery.SoC"] or 0) <= 100


@pytest.mark.integration
async def test_discovers_again_after_comm_loss(sim: Simulator) -> None:
    host, port, unit_id = sim.where(2)
    sink = RecordingSink()
    async with coordinator(device(host, port, unit_id, comm_loss_after=1), sink) as coord:
        assert await coord.poll_once()
        sim.unit(2).inject("comm_loss")
        assert not await coord.poll_once()
        sim.unit(2).clear("comm_loss")
        assert await coord.poll_once()
    assert coord.discoveries == 2
    assert coord.chain == PV_CHAIN
    assert sink.kinds() == [EventKind.COMM_LOST, EventKind.COMM_RESTORED]
    lost = [s for _, _, samples in sink.cycles for s in samples if s[2] is Quality.COMM_LOST]
    assert {n for n, _, _ in lost} >= {"mppt.module1.DCV", "inverter_three_phase.W"}


@pytest.mark.integration
async def test_unknown_model_polls_only_the_models_before_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unit = SimUnit(load_profile("EMU-BS"), 1)
    storage = next(h for h in unit.profile.headers if h.id == 124)
    unit._blocks[Table.HOLDING][storage.address - unit.profile.sunspec_base] = 64999
    dev = dataclasses.replace(unit.simdevice(), action=None)
    sink = RecordingSink()
    caplog.set_level(logging.WARNING, logger="agent")
    async with bare_server(dev) as port, coordinator(device(HOST, port), sink) as coord:
        assert await coord.poll_once()
    assert coord.chain == (1, 103, 64999, 802, 64901)
    assert [m.id for m in coord.profile.models] == [1, 103]
    values = sink.values()
    assert values["common.SN"] == unit.serial
    assert "inverter_three_phase.W" in values
    assert not any(n.startswith(("battery.", "emu.")) for n in values)
    assert any("64999" in r.getMessage() and "not polled" in r.getMessage()
               for r in caplog.records)


def _headers(series: str) -> list[ModelHeader]:
    return list(load_profile(series).headers)


def test_profile_from_chain_reproduces_a_shipped_chain() -> None:
    profile, notes = profile_from_chain(40000, _headers("EMU-PV"), manufacturer="M", model="X")
    assert notes == []
    assert [(m.id, m.repeats) for m in profile.models] == [
        (1, 0), (103, 0), (160, 2), (124, 0), (64901, 0)]
    assert profile.end_address == load_profile("EMU-PV").end_address
    assert (profile.series, profile.manufacturer, profile.model) == ("SUNSPEC", "M", "X")


def test_a_model_longer_than_its_definition_ends_the_chain_after_itself() -> None:
    hs = _headers("EMU-BS")
    hs[1] = dataclasses.replace(hs[1], length=hs[1].length + 4)  # model 103 with extra points
    shifted = [dataclasses.replace(h, address=h.address + 4) for h in hs[2:]]
    profile, notes = profile_from_chain(40000, [*hs[:2], *shifted])
    assert [m.id for m in profile.models] == [1, 103]
    assert len(notes) == 1
    assert "L=" in notes[0]
    assert "3 model(s) after it" in notes[0]


def test_a_repeated_model_ends_the_chain() -> None:
    hs = _headers("EMU-BS")
    dup = dataclasses.replace(hs[1], address=hs[-1].address + 2 + hs[-1].length)
    profile, notes = profile_from_chain(40000, [*hs, dup])
    assert [m.id for m in profile.models] == list(BS_CHAIN)
    assert notes == [f"model 103 at {dup.address} appears twice; it is not polled"]


def test_a_chain_without_the_common_model_is_refused() -> None:
    with pytest.raises(DiscoveryError, match="does not start with the common model"):
        profile_from_chain(40000, _headers("EMU-BS")[1:])
    with pytest.raises(DiscoveryError, match="does not start with the common model"):
        profile_from_chain(40000, [ModelHeader(64999, 10, 40002)])
