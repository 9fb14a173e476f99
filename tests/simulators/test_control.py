"""The control channel: JSON lines over loopback, the same requests `emu sim inject` sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from simulators.control import ControlServer, handle, request
from simulators.errors import ControlError
from simulators.server import SimConfig, Simulator
from tests.support.net import free_tcp_port


@pytest.fixture
async def control(sim: Simulator) -> AsyncIterator[ControlServer]:
    server = ControlServer(sim, 0)
    await server.start()
    yield server
    await server.stop()


async def test_inject_clear_and_status(sim: Simulator, control: ControlServer) -> None:
    answer = await request(control.port, {"op": "inject", "unit": 2, "fault": "derating",
                                          "params": {"limit_pct": 50}})
    assert answer["unit"]["faults"] == ["derating"]
    assert sim.unit(2).effects.derate_pct == 50
    status = await request(control.port, {"op": "status"})
    assert [u["faults"] for u in status["units"]] == [[], ["derating"], []]
    await request(control.port, {"op": "clear", "unit": 2})
    assert sim.unit(2).faults == {}


async def test_update_mode_and_values(sim: Simulator, control: ControlServer) -> None:
    await request(control.port, {"op": "update-mode", "unit": 1, "mode": "refuse"})
    assert sim.unit(1).firmware.behaviour.value == "refuse"
    values = await request(control.port, {"op": "values", "unit": 1})
    assert values["values"]["common.SN"] == sim.unit(1).serial


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"op": "inject", "unit": 9, "fault": "trip"}, "no unit 9"),
        ({"op": "inject", "unit": 1, "fault": "melting"}, "unknown fault"),
        ({"op": "update-mode", "unit": 1, "mode": "sideways"}, "unknown update behaviour"),
        ({"op": "explode"}, "unknown op"),
    ],
)
async def test_bad_requests_get_clear_errors(
    control: ControlServer, payload: dict[str, object], message: str
) -> None:
    with pytest.raises(ControlError, match=message):
        await request(control.port, payload)


async def test_malformed_lines_do_not_kill_the_channel(control: ControlServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", control.port)
    writer.write(b"{not json\n[1,2]\n")
    await writer.drain()
    first = await reader.readline()
    second = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert b"bad request" in first
    assert b"bad request" in second
    assert (await request(control.port, {"op": "faults"}))["ok"]


async def test_no_simulator_is_a_clear_error() -> None:
    with pytest.raises(ControlError, match="is `emu sim` running"):
        await request(free_tcp_port(), {"op": "status"}, wait_s=1.0)


def test_handle_in_process() -> None:
    sim = Simulator(SimConfig(units=1, port=0))
    assert handle(sim, {"op": "inject", "unit": 1, "fault": "trip"})["ok"]
    assert sim.unit(1).effects.tripped
