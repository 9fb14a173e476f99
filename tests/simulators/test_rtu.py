"""The simulator over Modbus RTU: a pymodbus serial client on one end of a socat pty pair."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType

from protocols.registers import PointType, decode
from protocols.sunspec import SUNS_MARKER
from simulators.errors import SimulatorError
from simulators.server import SimConfig, Simulator
from tests.support.process import read_until
from tests.support.serial_pair import SerialPair, serial_pair_fixture
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

serial_pair = serial_pair_fixture()

BAUDRATE = 19200
BASE = 40000
COMMON_LEN = 2 + 2 + 66  # SunS, model 1 header, model 1 body: static registers
MANUFACTURER = slice(4, 20)  # common model Mn, 16 registers after the header


@pytest.fixture
async def rtu_sim(serial_pair: SerialPair) -> AsyncIterator[Simulator]:
    """Two units (EMU-BS id 1, EMU-PV id 2) on the pty's end `a`, and on a free TCP port."""
    config = SimConfig(units=2, port=0, refresh_s=0.05, serial_port=serial_pair.a,
                       baudrate=BAUDRATE)
    async with Simulator(config) as sim:
        yield sim


@pytest.fixture
async def rtu_client(
    rtu_sim: Simulator, serial_pair: SerialPair
) -> AsyncIterator[AsyncModbusSerialClient]:
    """An RTU master on the pty's end `b`: short timeout, no retries, no reconnect loop."""
    client = AsyncModbusSerialClient(
        serial_pair.b, framer=FramerType.RTU, baudrate=BAUDRATE, timeout=0.5, retries=0,
        reconnect_delay=0,
    )
    assert await client.connect()
    yield client
    client.close()


async def read_block(client: AsyncModbusSerialClient, unit_id: int, count: int) -> list[int]:
    rr = await client.read_holding_registers(BASE, count=count, device_id=unit_id)
    assert not rr.isError(), f"unit {unit_id}: {rr}"
    return list(rr.registers)


async def test_each_unit_answers_with_suns_and_a_full_block(
    rtu_sim: Simulator, rtu_client: AsyncModbusSerialClient
) -> None:
    for unit_id, model in ((1, "EMU-BS100"), (2, "EMU-PV50H")):
        assert tuple(await read_block(rtu_client, unit_id, 2)) == SUNS_MARKER
        block = await read_block(rtu_client, unit_id, 125)
        assert len(block) == 125
        assert tuple(block[:4]) == (*SUNS_MARKER, 1, 66)
        assert decode(PointType.STRING, block[MANUFACTURER]) == "Shanghai Energy"
        assert rtu_sim.unit(unit_id).profile.model == model
        assert rtu_sim.unit(unit_id).stats.reads >= 2


async def test_rtu_and_tcp_serve_the_same_unit(
    rtu_sim: Simulator, rtu_client: AsyncModbusSerialClient
) -> None:
    host, port, unit_id = rtu_sim.where(1)
    tcp = AsyncModbusTcpClient(host, port=port, timeout=0.5, retries=0)
    assert await tcp.connect()
    try:
        rr = await tcp.read_holding_registers(BASE, count=COMMON_LEN, device_id=unit_id)
        assert not rr.isError()
        over_tcp = list(rr.registers)
    finally:
        tcp.close()
    assert await read_block(rtu_client, unit_id, COMMON_LEN) == over_tcp


async def test_comm_loss_silences_one_unit_on_the_bus(
    rtu_sim: Simulator, rtu_client: AsyncModbusSerialClient
) -> None:
    rtu_sim.unit(2).inject("comm_loss")
    with pytest.raises(ModbusIOException):
        await rtu_client.read_holding_registers(BASE, count=2, device_id=2)
    assert tuple(await read_block(rtu_client, 1, 2)) == SUNS_MARKER
    assert rtu_sim.unit(2).stats.dropped >= 1
    rtu_sim.unit(2).clear("comm_loss")
    assert tuple(await read_block(rtu_client, 2, 2)) == SUNS_MARKER


async def test_a_missing_serial_port_is_a_clear_error() -> None:
    sim = Simulator(SimConfig(units=1, port=0, serial_port="/nonexistent/ttyEMU"))
    with pytest.raises(SimulatorError, match="no such device"):
        await sim.start()
    assert all(ep.server is None for ep in sim.endpoints)  # TCP was stopped again


@pytest.mark.parametrize(
    "config",
    [
        {"units": 2, "one_port_per_unit": True},
        {"units": 3, "units_per_port": 2},
        {"units": 1, "baudrate": 0},
    ],
)
def test_serial_config_needs_one_bus(config: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"serial line|baudrate"):
        SimConfig(port=0, serial_port="/dev/null", **config)  # type: ignore[arg-type]


async def test_emu_sim_serial_process(serial_pair: SerialPair) -> None:
    """`emu sim --serial A` as a user runs it; a serial master on B reads unit 1."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emu", "sim", "--units", "2", "--port", "0", "--control-port",
        "0", "--serial", serial_pair.a, "--baudrate", str(BAUDRATE),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        banner = await read_until(proc.stdout, "control", 20, "the simulator's banner")
        assert f"modbus rtu {serial_pair.a} {BAUDRATE} 8N1 unit ids 1..2" in banner
        client = AsyncModbusSerialClient(
            serial_pair.b, baudrate=BAUDRATE, timeout=1, retries=0, reconnect_delay=0
        )
        assert await client.connect()
        try:
            assert tuple(await read_block(client, 2, 2)) == SUNS_MARKER
        finally:
            client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = await wait_for(proc.communicate(), 10, "the simulator to stop")
    assert proc.returncode == 0, rest
