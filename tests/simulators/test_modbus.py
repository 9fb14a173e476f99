"""The simulator over real Modbus TCP: SunSpec discovery, values, faults, firmware updates."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import sunspec2.modbus.client as sunspec_client
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from protocols.firmware import (
    FirmwareImage,
    UpdateError,
    UpdateMap,
    UpdateState,
    transfer_writes,
)
from simulators.server import SimConfig, Simulator
from tests.simulators.modbus_io import push_image, read_points, update_state
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def scan_with_pysunspec2(host: str, port: int, unit_id: int) -> dict[str, object]:
    """Discover a unit with the SunSpec Alliance's own client (blocking; run in a thread)."""
    dev = sunspec_client.SunSpecModbusClientDeviceTCP(slave_id=unit_id, ipaddr=host, ipport=port)
    try:
        dev.scan()
        common = dev.common[0]
        common.read()
        found: dict[str, object] = {
            "models": sorted(k for k in dev.models if isinstance(k, int)),
            "Mn": common.Mn.value, "Md": common.Md.value,
            "SN": common.SN.value, "Vr": common.Vr.value,
        }
        inv = dev.models[103][0]
        inv.read()
        found["W"] = inv.W.cvalue
        found["Hz"] = inv.Hz.cvalue
        if 802 in dev.models:
            bat = dev.models[802][0]
            bat.read()
            found["SoC"] = bat.SoC.cvalue
        if 160 in dev.models:
            mppt = dev.models[160][0]
            mppt.read()
            found["mppt_N"] = mppt.N.value
            found["mppt_DCV"] = mppt.module[0].DCV.cvalue
        storage = dev.models[124][0]
        storage.read()
        found["ChaState"] = storage.ChaState.cvalue
        return found
    finally:
        dev.close()


async def test_pysunspec2_discovers_each_unit(sim: Simulator) -> None:
    for number, expected in ((1, [1, 103, 124, 802, 64901]), (2, [1, 103, 124, 160, 64901]),
                             (3, [1, 103, 124, 802, 64901])):
        host, port, unit_id = sim.where(number)
        found = await asyncio.to_thread(scan_with_pysunspec2, host, port, unit_id)
        unit = sim.unit(number)
        assert found["models"] == expected
        assert found["Mn"] == "Shanghai Energy"
        assert found["Md"] == unit.profile.model
        assert found["SN"] == unit.serial
        assert found["Vr"] == "1.0.0"
        assert 49.5 < float(found["Hz"]) < 50.5  # type: ignore[arg-type]
        assert 0 <= float(found["ChaState"]) <= 100  # type: ignore[arg-type]
        if 802 in expected:
            assert 0 <= float(found["SoC"]) <= 100  # type: ignore[arg-type]
        if 160 in expected:
            assert found["mppt_N"] == 2
            assert float(found["mppt_DCV"]) > 500  # type: ignore[arg-type]


async def test_planner_reads_decode_to_the_simulated_values(
    sim: Simulator, client: AsyncModbusTcpClient
) -> None:
    for number in (1, 2):
        unit = sim.unit(number)
        readings = await read_points(client, unit.profile, unit.unit_id)
        truth = unit.values()
        assert readings["common.SN"].value == unit.serial
        assert readings["emu.FwVer"].value == "1.0.0"
        w = readings["inverter_three_phase.W"].value
        assert isinstance(w, float | int)
        assert abs(w - float(truth["inverter_three_phase.W"] or 0)) < 2000  # moves over time
        assert readings["emu.Status"].value == 2  # RUNNING
        assert readings["emu.Alarm"].value == 0


async def test_over_temperature_shows_within_a_second_and_clears(
    sim: Simulator, client: AsyncModbusTcpClient
) -> None:
    unit = sim.unit(2)
    profile = unit.profile
    before = await read_points(client, profile, unit.unit_id)
    base_tmp = before["emu.IntTmp"].value
    assert isinstance(base_tmp, float)
    alarm_bit = 1 << {n: b for b, n in profile.point("emu.Alarm").symbols}[
        "OVER_TEMPERATURE"
    ]
    injected_at = time.monotonic()
    unit.inject("over_temperature")

    async def hot() -> bool:
        r = await read_points(client, profile, unit.unit_id)
        tmp, alarm = r["emu.IntTmp"].value, r["emu.Alarm"].value
        return isinstance(tmp, float) and tmp > base_tmp + 30 and isinstance(alarm, int) and bool(
            alarm & alarm_bit
        )

    await wait_for(hot, 1.0, "over-temperature in the registers")
    assert time.monotonic() - injected_at < 1.0
    other = await read_points(client, sim.unit(1).profile, 1)
    assert other["emu.Alarm"].value == 0  # only the injected unit

    unit.clear("over_temperature")

    async def normal() -> bool:
        r = await read_points(client, profile, unit.unit_id)
        tmp = r["emu.IntTmp"].value
        return r["emu.Alarm"].value == 0 and isinstance(tmp, float) and tmp < base_tmp + 10

    await wait_for(normal, 1.0, "normal temperature after clearing")


@pytest.mark.parametrize(
    ("name", "point", "check"),
    [
        ("insulation_low", "emu.Riso", lambda v: v < 100),
        ("grid_loss", "inverter_three_phase.Hz", lambda v: v == 0),
        ("trip", "inverter_three_phase.St", lambda v: v == 7),
        ("derating", "emu.DerateLim", lambda v: v == 30),
        ("soc_low", "battery.SoC", lambda v: v < 5),
    ],
)
async def test_value_faults(
    sim: Simulator,
    client: AsyncModbusTcpClient,
    name: str,
    point: str,
    check: Callable[[float], bool],
) -> None:
    unit = sim.unit(1)
    unit.inject(name)
    readings = await read_points(client, unit.profile, 1)
    value = readings[point].value
    assert isinstance(value, int | float)
    assert check(value), readings[point]
    assert readings["emu.Alarm"].value != 0
    unit.clear()
    readings = await read_points(client, unit.profile, 1)
    assert readings["emu.Alarm"].value == 0


async def test_comm_loss_stops_answering_only_that_unit(
    sim: Simulator, client: AsyncModbusTcpClient
) -> None:
    sim.unit(3).inject("comm_loss")
    with pytest.raises(ModbusException):
        await client.read_holding_registers(40000, count=2, device_id=3)
    rr = await client.read_holding_registers(40000, count=2, device_id=1)
    assert rr.registers == [0x5375, 0x6E53]
    sim.unit(3).clear("comm_loss")
    rr = await client.read_holding_registers(40000, count=2, device_id=3)
    assert rr.registers == [0x5375, 0x6E53]
    assert sim.unit(3).stats.dropped >= 1


async def test_intermittent_comms_mixes_timeouts_and_exceptions(sim: Simulator) -> None:
    host, port, _ = sim.where(1)
    sim.unit(1).inject("intermittent_comms", {"rate": 0.5})
    ok = errors = timeouts = 0
    for _ in range(40):
        c = AsyncModbusTcpClient(host, port=port, timeout=0.2, retries=0)
        await c.connect()
        try:
            rr = await c.read_holding_registers(40000, count=2, device_id=1)
            if rr.isError():
                errors += 1
            else:
                ok += 1
        except ModbusException:
            timeouts += 1
        finally:
            c.close()
    assert ok, (ok, errors, timeouts)
    assert errors, (ok, errors, timeouts)
    assert timeouts, (ok, errors, timeouts)


async def test_slow_response_delays_answers(sim: Simulator, client: AsyncModbusTcpClient) -> None:
    sim.unit(1).inject("slow_response", {"delay_s": 0.25})
    started = time.monotonic()
    rr = await client.read_holding_registers(40000, count=2, device_id=1)
    assert not rr.isError()
    assert time.monotonic() - started >= 0.25
    sim.unit(1).inject("slow_response", {"delay_s": 0.8})  # longer than the client's timeout
    with pytest.raises(ModbusException):
        await client.read_holding_registers(40000, count=2, device_id=1)


async def test_writes_outside_the_update_registers_are_refused(
    client: AsyncModbusTcpClient,
) -> None:
    rr = await client.write_registers(40004, [1, 2], device_id=1)  # common.Mn
    assert rr.isError()


def _image(series: str, version: str, kib: int = 2) -> bytes:
    return FirmwareImage(series, version, bytes(range(256)) * (4 * kib)).to_bytes()


async def test_firmware_update_changes_the_reported_version(
    sim: Simulator, client: AsyncModbusTcpClient
) -> None:
    unit = sim.unit(1)
    assert await push_image(client, unit.profile, 1, _image("EMU-BS", "1.1.0")) is None
    assert await update_state(client, unit.profile, 1) is UpdateState.DONE
    readings = await read_points(client, unit.profile, 1)
    assert readings["emu.FwVer"].value == "1.1.0"
    assert readings["common.Vr"].value == "1.1.0"
    assert readings["emu.FwUpdProg"].value == 100
    assert readings["emu.Status"].value == 2


async def test_firmware_refused(sim: Simulator, client: AsyncModbusTcpClient) -> None:
    unit = sim.unit(1)
    unit.set_update_behaviour("refuse")
    await push_image(client, unit.profile, 1, _image("EMU-BS", "1.1.0"))
    readings = await read_points(client, unit.profile, 1)
    assert readings["emu.FwUpdSt"].value == UpdateState.REFUSED
    assert readings["emu.FwUpdErr"].value == UpdateError.REFUSED_BY_UNIT
    assert readings["emu.FwVer"].value == "1.0.0"


async def test_firmware_fails_midway_then_succeeds(
    sim: Simulator, client: AsyncModbusTcpClient
) -> None:
    unit = sim.unit(1)
    unit.set_update_behaviour("fail", fail_at=0.5)
    failed = await push_image(client, unit.profile, 1, _image("EMU-BS", "1.1.0"))
    assert failed is not None
    assert failed.startswith("chunk")
    readings = await read_points(client, unit.profile, 1)
    assert readings["emu.FwUpdSt"].value == UpdateState.FAILED
    assert readings["emu.FwUpdErr"].value == UpdateError.WRITE_FAILED
    assert readings["emu.FwVer"].value == "1.0.0"
    # the failure mode is one-shot: a retry goes through
    assert await push_image(client, unit.profile, 1, _image("EMU-BS", "1.1.0")) is None
    assert await update_state(client, unit.profile, 1) is UpdateState.DONE


async def test_firmware_comes_back_broken_and_rolls_back(
    sim: Simulator, client: AsyncModbusTcpClient
) -> None:
    unit = sim.unit(1)
    unit.set_update_behaviour("broken")
    await push_image(client, unit.profile, 1, _image("EMU-BS", "1.1.0"))
    assert await update_state(client, unit.profile, 1) is UpdateState.DONE
    readings = await read_points(client, unit.profile, 1)
    assert readings["emu.FwVer"].value == "1.1.0"
    assert readings["emu.Status"].value == 4  # FAULT
    assert readings["inverter_three_phase.W"].value == 0
    fw_bit = {n: b for b, n in unit.profile.point("emu.Alarm").symbols}["FIRMWARE_FAULT"]
    assert int(readings["emu.Alarm"].value or 0) & (1 << fw_bit)
    # rollback: install the previous version again
    await push_image(client, unit.profile, 1, _image("EMU-BS", "1.0.0"))
    assert await update_state(client, unit.profile, 1) is UpdateState.DONE
    readings = await read_points(client, unit.profile, 1)
    assert readings["emu.FwVer"].value == "1.0.0"
    assert readings["emu.Status"].value == 2
    assert readings["emu.Alarm"].value == 0


@pytest.mark.parametrize(
    ("image", "state", "error"),
    [
        (_image("EMU-PV", "2.0.0"), UpdateState.REFUSED, UpdateError.WRONG_SERIES),
        (b"not a firmware image at all" * 10, UpdateState.REFUSED, UpdateError.BAD_IMAGE),
    ],
)
async def test_firmware_rejects_foreign_images(
    sim: Simulator, client: AsyncModbusTcpClient, image: bytes, state: UpdateState,
    error: UpdateError,
) -> None:
    unit = sim.unit(1)
    await push_image(client, unit.profile, 1, image)
    assert await update_state(client, unit.profile, 1) is state
    readings = await read_points(client, unit.profile, 1)
    assert readings["emu.FwUpdErr"].value == error
    assert readings["emu.FwVer"].value == "1.0.0"


async def test_firmware_hash_mismatch(sim: Simulator, client: AsyncModbusTcpClient) -> None:
    unit = sim.unit(1)
    m = UpdateMap.of(unit.profile)
    good = _image("EMU-BS", "1.1.0")
    writes = transfer_writes(unit.profile, good)
    # corrupt one byte of the second chunk after the hash was announced
    idx = 3
    regs = list(writes[idx].registers)
    regs[5] ^= 0xFFFF
    for i, w in enumerate(writes):
        values = regs if i == idx else list(w.registers)
        await client.write_registers(w.address, values, device_id=1)
    assert await update_state(client, unit.profile, 1) is UpdateState.HASH_MISMATCH
    rr = await client.read_holding_registers(m.error.address, count=1, device_id=1)
    assert rr.registers == [UpdateError.HASH_MISMATCH]


async def test_one_port_per_unit() -> None:
    config = SimConfig(units=2, port=0, one_port_per_unit=True)
    async with Simulator(config) as sim:
        ports = {sim.where(n)[1] for n in (1, 2)}
        assert len(ports) == 2
        for n in (1, 2):
            host, port, unit_id = sim.where(n)
            assert unit_id == 1
            c = AsyncModbusTcpClient(host, port=port, timeout=0.5, retries=0)
            await c.connect()
            rr = await c.read_holding_registers(40000, count=2, device_id=1)
            c.close()
            assert rr.registers == [0x5375, 0x6E53]


async def test_fleet_mode_serves_hundreds_of_units_cheaply() -> None:
    config = SimConfig(units=300, port=0)
    async with Simulator(config) as sim:
        assert len(sim.endpoints) == 2  # 247 ids on the first port, 53 on the next
        host, port, unit_id = sim.where(300)
        assert unit_id == 53
        c = AsyncModbusTcpClient(host, port=port, timeout=0.5, retries=0)
        await c.connect()
        readings = await read_points(c, sim.unit(300).profile, unit_id)
        c.close()
        assert readings["common.SN"].value == sim.unit(300).serial
