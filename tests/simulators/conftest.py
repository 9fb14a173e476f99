"""A simulator on free ports and a pymodbus client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pymodbus.client import AsyncModbusTcpClient

from simulators.server import SimConfig, Simulator


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """Three units (EMU-BS, EMU-PV, EMU-BS) with ids 1..3 on one free port."""
    async with Simulator(SimConfig(units=3, port=0, reboot_s=0.3, refresh_s=0.05)) as s:
        yield s


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[AsyncModbusTcpClient]:
    """A connected pymodbus client with a short timeout and no retries."""
    host, port, _ = sim.where(1)
    c = AsyncModbusTcpClient(host, port=port, timeout=0.5, retries=0)
    assert await c.connect()
    yield c
    c.close()
